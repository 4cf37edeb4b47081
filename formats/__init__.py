"""File formats: the MER store, quantization, safetensors, GGUF, traces, predictors.

Installed as ``mer_cli.formats``; import it under that name.
"""
