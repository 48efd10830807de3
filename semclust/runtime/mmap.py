"""Memory-mapped rows: zero-copy tensors over numpy maps, page release, data fingerprints;
the C heap's free pages handed back (`trim_heap`)."""

from __future__ import annotations

import hashlib
import math
import mmap
import weakref

import numpy as np
import torch
from torch import Tensor


# bytes hashed per step of `fingerprint`: bounds the contiguous copy it makes of each chunk
_FINGERPRINT_CHUNK_BYTES = 1 << 24


def fingerprint(t: Tensor) -> str:
    """blake2b (32-byte hex) of a tensor's shape, dtype and every byte of its values.

    A resumed fit reuses what a run with the same fingerprint computed, so a sample of
    the rows is not enough: any changed element must change it. The rows are hashed in
    chunks, each copied to one contiguous CPU block of at most ~16 MiB (one row at the
    least), so memory stays bounded and a strided view hashes like its contiguous copy.
    """
    digest = hashlib.blake2b(digest_size=32)
    digest.update(repr((tuple(t.shape), str(t.dtype))).encode())
    rows = t.reshape(1, -1) if t.dim() == 0 else t
    row_bytes = math.prod(rows.shape[1:]) * t.element_size()
    step = max(1, _FINGERPRINT_CHUNK_BYTES // max(1, row_bytes))
    for start in range(0, rows.shape[0], step):
        chunk = rows[start:start + step].detach().to("cpu").contiguous()
        # bytes, not values: exact for every dtype, bfloat16 included (which numpy lacks)
        digest.update(chunk.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# base address -> the mmap under a memory-mapped tensor, for `release`
_MAPPED: dict[int, tuple[weakref.ref, int]] = {}


def as_tensor(a: np.ndarray) -> Tensor:
    """Zero-copy tensor over an array; a read-only memory map is reopened copy-on-write
    so torch can wrap it (no page is copied unless written). Memory maps are registered
    for `release`."""
    if isinstance(a, np.memmap) and not a.flags.writeable:
        a = np.load(a.filename, mmap_mode="c")
    t = torch.from_numpy(a)
    if isinstance(a, np.memmap) and getattr(a, "_mmap", None) is not None and a.nbytes:
        _MAPPED[t.data_ptr()] = (weakref.ref(a), a.nbytes)
    return t


def release(*tensors: Tensor | np.memmap) -> None:
    """Let the OS take back the pages of memory-mapped tensors (or numpy memory maps)
    this process has touched.

    Pages of a mapped file that were read stay in the process's resident set (and its
    peak RSS) until unmapped, so a pass over a 1M x 512 fp16 store would hold 1 GB
    resident. MADV_DONTNEED drops them from this process; the next access reads them
    again from the page cache. Tensors that are not registered memory maps are ignored.
    """
    for t in tensors:
        if isinstance(t, np.memmap):
            if getattr(t, "_mmap", None) is not None:
                t._mmap.madvise(mmap.MADV_DONTNEED)
            continue
        if not isinstance(t, Tensor) or t.device.type != "cpu":
            continue
        ptr = t.data_ptr()
        for base, (ref, size) in list(_MAPPED.items()):
            arr = ref()
            if arr is None:
                del _MAPPED[base]
            elif base <= ptr < base + size and hasattr(arr._mmap, "madvise"):
                arr._mmap.madvise(mmap.MADV_DONTNEED)


def trim_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere).

    Memory that C++ code frees stays in the process's heap for reuse, counted in its RSS:
    after the 1M-row kNN, whose two faiss IVF indexes took 1.3 GB each, 2.2 GB of
    anonymous memory stayed resident through stage 1 (peak RSS 4.5 GB). malloc_trim
    returns every free page, not only those at the top of the heap."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
