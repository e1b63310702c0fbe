"""Model resolution, LoRA attachment and adapter state in and out."""
