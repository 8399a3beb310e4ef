"""Synthetic compositional world: procedurally rendered scenes with captions and Q&A."""
