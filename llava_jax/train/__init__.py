"""Training: optimizer and stage masks (optim), LoRA (lora), the sharded step (step), the loop (loop)."""
