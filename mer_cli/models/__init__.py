"""Model architectures: configuration, tensor naming and forward passes."""
