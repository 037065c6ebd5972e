"""The GAN: networks, losses, the training loop, checkpoints, DDP."""
