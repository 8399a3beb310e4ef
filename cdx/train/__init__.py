"""Training: parameter selection, LoRA, optimizer, the jitted step, the loop."""
