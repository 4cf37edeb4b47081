"""Page-aligned slabs: the fixed-size buffers expert extents are read into.

All slabs come from ONE anonymous memory map allocated when the pool is created
and never resized, so the expert cache has no allocation churn and every slab
starts on a page boundary (what O_DIRECT needs for the buffer address). A slab
is exactly one store extent long; the kernels work on its bytes in place.
"""

from __future__ import annotations

import mmap

import numpy as np

from mer_cli.errors import ResourceError
from mer_cli.formats.quant import PAGE
from mer_cli.units import format_size


class SlabPool:
    """``count`` slabs of ``slab_nbytes`` bytes each, in one anonymous mapping.

    Parameters
    ----------
    slab_nbytes
        Size of one slab: the store's extent size, a multiple of 4096.
    count
        Number of slabs (cache slots), at least 1.
    populate
        Fault every page in now (``MAP_POPULATE``) so the resident set is the
        whole budget from the start and reads never stall on page faults.

    Attributes
    ----------
    slabs : list of numpy.ndarray
        ``uint8 [slab_nbytes]`` views, one per slab, writable (the reader fills
        them); :meth:`view` gives read-only ones for the compute.
    """

    def __init__(self, slab_nbytes: int, count: int, *, populate: bool = True) -> None:
        if slab_nbytes <= 0 or slab_nbytes % PAGE:
            raise ValueError(
                f"slab size {slab_nbytes} is not a positive multiple of {PAGE}"
            )
        if count < 1:
            raise ValueError(f"slab count {count} must be at least 1")
        self.slab_nbytes = slab_nbytes
        self.count = count
        total = slab_nbytes * count
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if populate and hasattr(mmap, "MAP_POPULATE"):
            flags |= mmap.MAP_POPULATE
        try:
            self._map = mmap.mmap(-1, total, flags=flags)
        except OSError as e:
            raise ResourceError(
                f"cannot allocate {format_size(total)} for {count} expert slabs "
                f"({e.strerror}); lower --ram-budget"
            ) from e
        self._array = np.frombuffer(self._map, dtype=np.uint8)
        self.base_address = self._array.ctypes.data
        self.slabs = [
            self._array[i * slab_nbytes : (i + 1) * slab_nbytes] for i in range(count)
        ]
        ro = self._array.view()
        ro.flags.writeable = False
        self._readonly = [
            ro[i * slab_nbytes : (i + 1) * slab_nbytes] for i in range(count)
        ]

    @property
    def nbytes(self) -> int:
        return self.slab_nbytes * self.count

    def view(self, i: int) -> np.ndarray:
        """Read-only ``uint8 [slab_nbytes]`` view of slab ``i`` for the compute."""
        return self._readonly[i]

    def address(self, i: int) -> int:
        """Virtual address of slab ``i`` (a multiple of the page size)."""
        return self.base_address + i * self.slab_nbytes

    def close(self) -> None:
        """Drop the views and unmap (views handed out must no longer be used)."""
        self.slabs = []
        self._readonly = []
        self._array = None
        try:
            self._map.close()
        except BufferError:
            # A caller still holds a view; the mapping goes when that view does.
            pass
