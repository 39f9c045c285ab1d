"""The trainer: config, model, parallel layers, data, train loop, checkpoints, conversion, generation."""
__version__ = "0.1.0"
