"""One fine-tune from one config: the training loop, exact probes, the finals, inference, checkpoints."""
