"""Crash-safe file writes (a reader sees the old file or the new one, never half of one),
the checks that keep a crafted or damaged file from reaching a reader, and the safe
loading of training checkpoints."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Optional

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

TMP_PREFIX = ".tmp-"
_HASH_BLOCK = 1 << 22
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError, RuntimeError):
    """No space (or quota) left for a write. An OSError with its errno for code that
    handles those, and a RuntimeError so a command line prints its one line."""


def write_error(e: OSError, what: str, where: Path, remedy: str = "free space") -> OSError:
    """`e` as one line naming what could not be written where, with the remedy: a
    DiskFullError when the disk (or quota) is full, else an OSError of the same errno."""
    kind = DiskFullError if e.errno in _DISK_FULL else OSError
    return kind(e.errno, f"cannot {what} in {where}: {e.strerror or e}; {remedy}")


class DamagedFileError(ValueError):
    """A file whose header and size disagree (truncated, or crafted to declare more)."""


def npy_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype, bool]:
    """(shape, dtype, fortran_order) of an `.npy` file, checked against its size.

    A header is a promise the reader acts on: `np.load` maps or allocates what it
    declares, so a truncated file fails with "mmap length is greater than file size" and
    one declaring 2^40 rows with MemoryError, neither naming the file. Raises
    DamagedFileError naming it instead.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            # 3.0 differs from 2.0 only in allowing utf-8 field names, which no float array has
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset = f.tell()
    except (ValueError, SyntaxError, EOFError) as e:
        raise DamagedFileError(f"{path} is not a readable .npy file ({e})") from None
    need = offset + int(np.prod(shape, dtype=object)) * dtype.itemsize
    size = path.stat().st_size
    if size < need:
        raise DamagedFileError(f"{path} is damaged: its header declares {dtype} {tuple(shape)} ({need} bytes) "
                               f"but the file has {size} bytes")
    return tuple(shape), dtype, bool(fortran)


def plain_name(name: object) -> bool:
    """True for a file name that stays in the directory it is joined to: a non-empty
    string without separators, NUL, "." or ".." (so not absolute either)."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def resolves_inside(root: Path, name: str) -> bool:
    """False when `root / name` is a symlink (or under one) that leads out of `root`."""
    return (root / name).resolve().is_relative_to(root.resolve())


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
    """Write `path` via `write(binary_file)` to a temp file in the same dir, fsync, replace.

    A full disk raises DiskFullError naming the file; the temp file is removed and `path`
    keeps its old content."""
    path = Path(path)
    try:
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
    except OSError as e:
        if e.errno in _DISK_FULL and not isinstance(e, DiskFullError):
            raise write_error(e, f"write {path.name}", path.parent) from None
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
