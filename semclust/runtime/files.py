"""Crash-safe file writes (a reader sees the old file or the new one, never half of one)
and the safe loading of training checkpoints."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Optional

import torch
from safetensors.torch import save as safetensors_bytes

TMP_PREFIX = ".tmp-"
_HASH_BLOCK = 1 << 22


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    # the rename itself is only durable once the directory entry is flushed (POSIX)
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` via `write(binary_file)` to a temp file in the same dir, fsync, replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX + path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    """safetensors file written atomically (safetensors loads without executing code)."""
    blob = safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write(Path(path), lambda f: f.write(blob))


def load_checkpoint(path: Path, run_id: str, what: str, same: str) -> dict:
    """A training checkpoint written by `torch.save` of a dict with key "run", loaded
    safely (`weights_only=True`); ValueError when it is unreadable or another run's.
    `what` names it ("stage-1 checkpoint"), `same` says what a run is ("data, K, seed")."""

    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is reported the same way, with its cause
        raise ValueError(f"cannot resume: {path} is not a readable {what} ({type(e).__name__}: {e})") from None
    if not isinstance(ck, dict) or ck.get("run") != run_id:
        raise ValueError(f"cannot resume: {path} was written by another run (other {same}); "
                         "delete it or start without resume")
    return ck
