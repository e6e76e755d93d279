"""detkd: train teacher detectors and distill them into small low-resolution students."""

__version__ = "0.1.0"
