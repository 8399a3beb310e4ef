"""Pure-functional Flax models: SigLIP vision tower, MLP adapter, Qwen2 decoder, LLaVA."""
