"""The training loop and what it owns: optimizer and schedule, checkpoints, distributed backends, callbacks."""
