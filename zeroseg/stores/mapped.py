"""Rows of a chunked array read in place: its raw chunk files mapped side by side into one span of
memory, so that any set of rows is one numpy gather served by the OS's page cache.

Why: re-ranking a neighbour index from the store reads a few hundred single rows (crop features)
scattered over as many chunks. Decoding a 2 MB Zarr chunk per candidate took ~1.8 s a query; a
row of a mapped raw chunk is ~0.4 us. Nothing is copied into this process: the pages are the file
cache's, shared with other readers and reclaimable, so the index's own RAM stays its codes and ids.

How: a span of address space is reserved (anonymous, read-only, zero pages: a chunk with no file
reads as the array's zero fill), then each chunk file is mapped over its slot with MAP_FIXED at a
stride that is a whole number of pages and of rows; the span is then one (slots * rows, row...)
array. Linux only (libc's mmap through ctypes: Python's mmap keeps a file descriptor per map and
cannot place it); callers check `available()` and read whole chunks elsewhere.

A chunk file must not shrink while it is mapped (reading past a file's end is SIGBUS): zeroseg
only rewrites a chunk that `store verify --repair` marked pending, and an index warns when its
store's status changed since the build.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import sys
import weakref
from typing import Sequence

import numpy as np

# Linux's values (Python 3.11's mmap module does not export the first two).
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000


class ShortChunkFile(OSError):
    """A chunk file shorter than a chunk: damaged (mapping it would fault on reading past its end)."""


def available() -> bool:
    return sys.platform.startswith("linux")


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def _check(addr, what: str) -> int:
    if addr is None or addr == ctypes.c_void_p(-1).value:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {what} failed: {os.strerror(err)}")
    return addr


class MappedRows:
    """`files[i]` holds chunk i: `rows_per_chunk` rows of `row_shape` `dtype` (little-endian, C order)
    at offset 0 (what follows, e.g. a checksum, is not read); None or a missing file reads as zeros.
    `rows(flat)` gathers rows by their index in the whole array (a copy). `array` is the span itself:
    valid only while this object lives (the span is unmapped when it goes, or on `close`)."""

    def __init__(self, files: Sequence[str | None], rows_per_chunk: int, row_shape: tuple[int, ...], dtype):
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.row_shape = tuple(row_shape)
        self.rows_per_chunk = rows_per_chunk
        row_bytes = self.dtype.itemsize * math.prod(self.row_shape)
        chunk_bytes = row_bytes * rows_per_chunk
        unit = math.lcm(mmap.PAGESIZE, row_bytes)  # a slot starts on a page and on a row
        slot = -(-chunk_bytes // unit) * unit
        self.rows_per_slot = slot // row_bytes
        total = max(1, len(files)) * slot
        libc = _libc()
        base = _check(libc.mmap(None, total, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
                                -1, 0), "the reserved span")
        # Unmapped when this object goes, whatever happens below (a short file raises midway).
        self._unmap = weakref.finalize(self, libc.munmap, base, total)
        for i, path in enumerate(files):
            if path is None or not os.path.exists(path):
                continue
            size = os.path.getsize(path)
            if size < chunk_bytes:
                self._unmap()
                raise ShortChunkFile(f"chunk file {path} is {size} bytes, a chunk takes {chunk_bytes}")
            fd = os.open(path, os.O_RDONLY)
            try:
                # one mapping per chunk: more chunks than vm.max_map_count (65530 by default) fail here
                _check(libc.mmap(base + i * slot, chunk_bytes, mmap.PROT_READ, mmap.MAP_SHARED | _MAP_FIXED, fd, 0),
                       path)
            except OSError:
                self._unmap()
                raise
            finally:
                os.close(fd)  # the map keeps the file; no descriptor per chunk stays open
        span = (ctypes.c_char * total).from_address(base)
        self.array = np.frombuffer(span, dtype=self.dtype).reshape((-1, *self.row_shape))  # (slots * rows_per_slot, ...)

    def rows(self, flat: np.ndarray) -> np.ndarray:
        """Row indices (n,) of the whole array -> a copy of those rows (n, *row_shape)."""
        chunk, within = np.divmod(np.asarray(flat, dtype=np.int64), self.rows_per_chunk)
        return self.array[chunk * self.rows_per_slot + within]

    def close(self) -> None:
        self.array = None
        self._unmap()
