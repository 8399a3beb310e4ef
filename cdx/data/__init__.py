"""Data: LLaVA sources, chat templates and labels, images, grain pipelines, synthetic world."""
