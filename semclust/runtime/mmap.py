"""Memory-mapped rows: zero-copy tensors over numpy maps, page release, data fingerprints."""

from __future__ import annotations

import hashlib
import mmap
import weakref

import numpy as np
import torch
from torch import Tensor


def fingerprint(t: Tensor, samples: int = 1024) -> str:
    """sha256 of a tensor's shape and a strided sample of its rows (at most `samples` + 1):
    cheap on a memory-mapped [N, D], and it changes when the data do in practice."""
    rows = t[:: max(1, t.shape[0] // samples)].detach().float().cpu().contiguous()
    return hashlib.sha256(repr(tuple(t.shape)).encode() + rows.numpy().tobytes()).hexdigest()


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
