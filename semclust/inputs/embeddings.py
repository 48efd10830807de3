"""Embedding and label files: `.npy`, `.pt`/`.pth`, `.safetensors`, folders of `.npy` shards."""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..runtime.files import npy_header
from .sources import PathLike

log = logging.getLogger(__name__)

# Rows per block when checking a (possibly memory-mapped) embedding file for NaN/Inf:
# bounds the temporary boolean mask instead of allocating one as large as the file.
_FINITE_CHECK_ROWS = 65536


def load_embeddings(path: PathLike, mmap: bool = False, dtype: torch.dtype | None = torch.float32) -> Tensor:
    """Embeddings [N, D] from `.npy`, `.pt`/`.pth`, `.safetensors` or a folder of `.npy` shards.

    - `.npy`: with `mmap=True` the file is memory-mapped rather than read; the map is
      copy-on-write, so writing into the tensor neither changes the file nor crashes.
    - `.pt`/`.pth`: `torch.load(weights_only=True)` of a tensor or a dict with key
      "embeddings" (`mmap` is passed on to torch.load).
    - `.safetensors`: the tensor named "embeddings".
    - folder: its `*.npy` shards in natural order ("2" before "10"), rows concatenated
      (into memory, even with `mmap=True`, unless there is a single shard).

    Args:
        path: the file or shard folder.
        mmap: memory-map instead of reading (for files larger than RAM).
        dtype: result dtype (float32 by default); None keeps the stored floating dtype,
            which with `mmap=True` on an fp16 file avoids any copy.
    Returns:
        Tensor [N, D] on CPU.
    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: unknown format, not 2-D, not floating, empty, rows with NaN/Inf, or an
            `.npy` file shorter than its header declares (DamagedFileError).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"embedding file or folder {str(path)!r} does not exist")
    t = _read_embeddings(path, mmap)
    if t.dim() != 2:
        raise ValueError(f"embeddings in {str(path)!r} must be 2-D [N, D], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"embeddings in {str(path)!r} must be floating point, got {t.dtype}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"embeddings in {str(path)!r} are empty (shape {tuple(t.shape)})")
    _check_finite(t, path)
    if dtype is not None and t.dtype != dtype:
        if mmap:
            log.info("converting memory-mapped %s from %s to %s copies it into memory", path, t.dtype, dtype)
        t = t.to(dtype)
    return t


class UnsafeTensorFile(ValueError):
    """A .pt/.pth/.safetensors file that is corrupt or pickles more than tensors. torch.load
    runs with weights_only=True, so none of its code ran; `reason` says what refused it."""

    def __init__(self, path: Path, cause: BaseException) -> None:
        if isinstance(cause, pickle.UnpicklingError):
            self.reason = ("torch.load(weights_only=True) refused it: it is corrupt or pickles objects "
                           "other than tensors")
        else:
            first = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")
            self.reason = f"{type(cause).__name__}: {first[:200]}"
        super().__init__(f"cannot load {path}: not a safe tensor file ({self.reason})")


def _read_tensor_file(path: Path, mmap: bool) -> Tensor:
    try:
        if path.suffix.lower() in (".pt", ".pth"):
            return _pick_tensor(torch.load(path, map_location="cpu", weights_only=True, mmap=mmap), path)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if "embeddings" not in f.keys():
                raise ValueError(f"{str(path)!r} has no tensor named 'embeddings' (found {list(f.keys())})")
            return f.get_tensor("embeddings")
    except (OSError, ValueError):  # the system's, and our own checks: each says what it is
        raise
    except Exception as e:  # a corrupt file breaks torch's unpickler or safetensors in many ways (KeyError, EOFError ...)
        raise UnsafeTensorFile(path, e) from None


def _read_embeddings(path: Path, mmap: bool) -> Tensor:
    if path.is_dir():
        shards = sorted(path.glob("*.npy"), key=_natural_key)
        if not shards:
            raise ValueError(f"embedding folder {str(path)!r} has no .npy shards")
        parts = [_read_npy(s, mmap) for s in shards]
        widths = {p.shape[1:] for p in parts}
        if len(widths) > 1 or any(p.dim() != 2 for p in parts):
            shapes = {s.name: tuple(p.shape) for s, p in zip(shards, parts)}
            raise ValueError(f"shards in {str(path)!r} must all be [n_i, D] with one D, got {shapes}")
        return torch.cat(parts) if len(parts) > 1 else parts[0]
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _read_npy(path, mmap)
    if suffix in (".pt", ".pth", ".safetensors"):
        return _read_tensor_file(path, mmap)
    raise ValueError(
        f"unknown embedding format {suffix!r} for {str(path)!r}; "
        "use .npy, .pt/.pth, .safetensors or a folder of .npy shards"
    )


def _read_npy(path: Path, mmap: bool) -> Tensor:
    # np.load believes the header: one declaring more rows than the file holds would
    # allocate them (MemoryError) or overrun the map, without naming the file
    npy_header(path)
    # "c" (copy-on-write) rather than "r": torch cannot mark a tensor read-only, and a
    # write into a read-only map would crash the process
    arr = np.load(path, mmap_mode="c" if mmap else None, allow_pickle=False)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"embeddings in {str(path)!r} must be floating point, got dtype {arr.dtype}")
    return torch.from_numpy(arr)


def _pick_tensor(obj: Any, path: Path) -> Tensor:
    if isinstance(obj, dict):
        if "embeddings" not in obj:
            raise ValueError(f"{str(path)!r} holds a dict without key 'embeddings' (keys: {list(obj)[:10]})")
        obj = obj["embeddings"]
    if not isinstance(obj, Tensor):
        raise ValueError(f"{str(path)!r} must hold a tensor or a dict with key 'embeddings', got {type(obj).__name__}")
    return obj


def _natural_key(p: Path) -> list[Any]:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", p.name)]


def _check_finite(t: Tensor, path: Path) -> None:
    bad = 0
    for start in range(0, t.shape[0], _FINITE_CHECK_ROWS):
        block = t[start : start + _FINITE_CHECK_ROWS]
        bad += int((~torch.isfinite(block)).any(dim=1).sum())
    if bad:
        raise ValueError(
            f"embeddings in {str(path)!r} have {bad} of {t.shape[0]} rows with NaN or Inf; drop or recompute them"
        )


def load_labels(path: PathLike) -> np.ndarray:
    """Integer labels [N] int64 from `.npy` (1-D integer array) or `.txt`/`.csv` (one
    integer per line; blank lines ignored).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown format, a line that is not an integer, not 1-D / integer, empty.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        npy_header(path)
        arr = np.load(path, allow_pickle=False)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{str(path)!r} must hold a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
        labels = arr.astype(np.int64)
    elif suffix in (".txt", ".csv"):
        labels = np.array(_parse_int_lines(path), dtype=np.int64)
    else:
        raise ValueError(f"unknown labels format {suffix!r} for {str(path)!r}; use .npy, .txt or .csv")
    if labels.size == 0:
        raise ValueError(f"labels file {str(path)!r} is empty")
    return labels


def _parse_int_lines(path: Path) -> list[int]:
    values = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            try:
                values.append(int(text))
            except ValueError:
                raise ValueError(f"{str(path)!r} line {lineno}: expected one integer per line, got {text!r}") from None
    return values


