"""Training: the trainer, the loss registry, weight sync and checkpoints."""
