"""Local LoRA training steps and held-out evaluation."""
