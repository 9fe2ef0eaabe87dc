"""Training: the objective, LoRA adapters, checkpoints and the training loop."""
