"""Running the model: the training step, inference, optimizer, checkpoints, preemption."""
