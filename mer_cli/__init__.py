"""mer: run Mixture-of-Experts models on CPU with experts streamed from NVMe."""

__version__ = "0.1.0"
