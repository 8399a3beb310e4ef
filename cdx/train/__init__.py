"""Training: parameter selection, LoRA, optimizer, the generic jitted step, the experiment
builder (setup.py), the loop."""
