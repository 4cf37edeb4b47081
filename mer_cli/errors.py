"""Errors that mean "the user's input is wrong", shown without a traceback.

Library code raises a ``MerError`` subclass whose message says what, where, the
value, what was expected and the fix. The CLI prints it and exits with
``exit_code`` (1 for bad data, 2 for bad usage).
"""

from __future__ import annotations


class MerError(Exception):
    """Base class for errors shown to the user as a one-paragraph message."""

    exit_code = 1


class FormatError(MerError):
    """A file (store, safetensors, GGUF, trace, predictor) is malformed."""


class UnsupportedError(MerError):
    """Valid input that mer does not support (architecture, dtype, quant type)."""


class UsageError(MerError):
    """Bad combination of options or arguments."""

    exit_code = 2


class ResourceError(MerError):
    """Not enough memory, disk space, or permission to proceed."""


class ReadError(MerError):
    """An I/O error while reading data (after retries)."""
