"""Training: the data, losses and loops that distil or fine-tune a reshaped model."""
