"""Expert I/O: page-aligned slabs and the O_DIRECT extent reader."""

from mer_cli.io.reader import (
    DEMAND,
    PREFETCH,
    AlignmentError,
    BufferedFallbackWarning,
    ExtentReader,
    ReadRequest,
)
from mer_cli.io.slabs import SlabPool

__all__ = [
    "DEMAND",
    "PREFETCH",
    "AlignmentError",
    "BufferedFallbackWarning",
    "ExtentReader",
    "ReadRequest",
    "SlabPool",
]
