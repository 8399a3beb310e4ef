"""Evaluation: KV-cached generation, compositional-reasoning and VQA scorers."""
