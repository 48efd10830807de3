"""A fit's working set: the [N, ...] arrays between phases, in memory or on disk.

`fit` on a million images must not hold N x D floats in RAM, and a run killed in stage 1
should not redo the hour of k-means and kNN before it. So every per-row intermediate
(the consolidated image rows, the text counterparts, the two kNN lists) is allocated
through a `Workspace`:

* ``Workspace(None)`` keeps them in memory (small data, tests, the default).
* ``Workspace(dir, run)`` writes each one as an ``.npy`` file, filled chunk by chunk
  through a memory map under a temporary name, flushed and renamed when complete, and
  recorded in ``workspace.json`` (rewritten atomically). Readers memory-map them, so the
  OS pages rows in and out and peak memory follows the chunk sizes, not N. A later fit
  of the same run (same data fingerprint and settings) finds the finished arrays and
  skips their phases; a directory of another run is refused unless it is started over.

An on-disk workspace holds an exclusive lock on ``<dir>/.lock`` (``flock``, released on
`close`, when the object is collected, or when the process dies, so a killed run leaves
no stale lock): two runs filling the same temporary file would corrupt it, so a second
process gets WorkspaceBusy. Workspaces of one process share the lock. The first to take
it removes the temporary files of writes killed midway. ``workspace.json`` is input
like any other: every name it lists must be a file inside the directory.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from . import distributed as dist
from .files import TMP_PREFIX, DamagedFileError, atomic_write, npy_header, plain_name, resolves_inside, write_error
from .mmap import as_tensor

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks, runs are not kept apart
    fcntl = None

log = logging.getLogger(__name__)

STATE = "workspace.json"
LOCK = ".lock"
FORMAT = "semclust-workspace/1"


class WorkspaceError(ValueError):
    """workspace.json lists something that is not a file of the workspace."""


class DirectoryBusy(RuntimeError):
    """Another process holds the directory's lock (`hold_directory`)."""


class WorkspaceBusy(DirectoryBusy):
    """Another process holds the workspace directory's lock."""


# resolved directory -> [lock file descriptor, Workspaces of this process using it]
_HELD: dict[Path, list[int]] = {}
_HELD_GUARD = threading.Lock()


def _lock(root: Path, busy: Callable[[str], DirectoryBusy]) -> tuple[Path, bool]:
    """Take `root`'s lock for this process: (its key, True when this call took it first);
    `busy(pid of the holder)` is the error when another process holds it."""
    key = root.resolve()
    with _HELD_GUARD:
        if key in _HELD:
            _HELD[key][1] += 1
            return key, False
        fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise busy(holder) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid only makes the refusal of a second run more helpful
        _HELD[key] = [fd, 1]
        return key, True


def _unlock(key: Path) -> None:
    with _HELD_GUARD:
        held = _HELD[key]
        held[1] -= 1
        if not held[1]:
            # the file stays: unlinking it would let a third run lock a new inode while
            # a second still waits on the old one
            os.close(held[0])
            del _HELD[key]


def hold_directory(owner: object, root: Path,
                   busy: Callable[[str], DirectoryBusy]) -> tuple[Optional[weakref.finalize], bool]:
    """Take the lock on `root`/.lock (`root` exists) for this process on behalf of `owner`:
    (its release, True when this process took it first). The release is idempotent and
    also runs when `owner` is collected or the process dies, so a killed run leaves no stale
    lock. `busy(pid)` is raised when another process holds it. Without POSIX locks (not
    Linux / macOS) nothing is held: (None, False)."""
    if fcntl is None:
        return None, False
    key, first = _lock(root, busy)
    return weakref.finalize(owner, _unlock, key), first


def _reserve(path: Path) -> None:
    """Give the (sparse) file all its blocks now: a full disk is an OSError here, not a
    SIGBUS later when a write through the memory map finds no block."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "rb+") as f:
        os.posix_fallocate(f.fileno(), 0, path.stat().st_size)


class Workspace:
    """Per-row arrays of one fit run, in memory (``root=None``) or memory-mapped files.

    On disk it holds the directory's lock until `close` (or use it as a context manager).
    """

    def __init__(self, root: Optional[Union[str, os.PathLike]], run: str = "", fresh: bool = False) -> None:
        self.root = None if root is None else Path(root)
        self.run = run
        self._memory: dict[str, Tensor] = {}
        self._release: Optional[weakref.finalize] = None
        if self.root is None:
            return
        try:
            if dist.is_distributed():
                # rank 0 sets the directory up and keeps other runs out; the others wait
                # and then read what it wrote
                if torch.distributed.get_rank() == 0:
                    self._open(run, fresh)
                dist.barrier()
                if self._state().get("run") != run:
                    raise ValueError(f"{self.root} was set up for another run by rank 0: "
                                     "is it on storage every rank shares?")
                return
            self._open(run, fresh)
        except BaseException:
            self.close()
            raise

    def _open(self, run: str, fresh: bool) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        root = self.root
        self._release, first = hold_directory(self, root, lambda pid: WorkspaceBusy(
            f"another semclust run is using {root} (pid {pid}); wait for it to end or choose another checkpoint_dir"))
        if first:
            self._remove_stale()
        state = self._state()
        if state and state.get("run") != run and not fresh:
            raise ValueError(
                f"cannot resume: {self.root} holds the working files of another run (other data, K, seed or "
                "settings); delete it or start without resume")
        if fresh or state is None or state.get("run") != run:
            for name in (state or {}).get("arrays", {}):
                (self.root / f"{name}.npy").unlink(missing_ok=True)
            self._write_state({"format": FORMAT, "run": run, "arrays": {}})

    def _remove_stale(self) -> None:
        # no other run holds the lock, so a temporary file is what a killed write left
        for stale in self.root.glob(TMP_PREFIX + "*"):
            if stale.is_file() or stale.is_symlink():
                log.info("workspace: removing %s, left by an interrupted write", stale)
                stale.unlink()

    def close(self) -> None:
        """Release the directory's lock (the files stay for a later run); idempotent."""
        if self._release is not None:
            self._release()

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    @property
    def on_disk(self) -> bool:
        return self.root is not None

    def _state(self) -> Optional[dict[str, Any]]:
        file = self.root / STATE
        if not file.is_file():
            return None
        try:
            state = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file} is damaged ({e}); delete the directory to start over") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"{file} is not a {FORMAT} file")
        self._check_state(file, state)
        return state

    def _check_state(self, file: Path, state: dict[str, Any]) -> None:
        """Refuse a state that names anything but files of this directory: its names are
        joined to the directory and unlinked (a fresh run) or mapped (a resumed one)."""

        def bad(field: str, why: str) -> WorkspaceError:
            return WorkspaceError(f"{file}: field {field} {why}; delete the directory to start over")

        if not isinstance(state.get("run"), str):
            raise bad("'run'", "must be a string")
        arrays = state.get("arrays")
        if not isinstance(arrays, dict):
            raise bad("'arrays'", "must be an object")
        for name, entry in arrays.items():
            field = f"arrays[{name!r}]"
            if not plain_name(name) or not resolves_inside(self.root, f"{name}.npy"):
                raise bad(field, f"names a file outside {self.root}")
            shape = entry.get("shape") if isinstance(entry, dict) else None
            if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
                    or not isinstance(entry.get("dtype"), str)):
                raise bad(field, 'must be {"shape": [non-negative ints], "dtype": "<numpy dtype>"}')

    def _write_state(self, state: dict[str, Any]) -> None:
        blob = json.dumps(state, indent=1).encode()
        atomic_write(self.root / STATE, lambda f: f.write(blob))

    def path(self, name: str) -> Optional[Path]:
        """Where a file `name` of this run goes (checkpoints); None in memory."""
        return None if self.root is None else self.root / name

    def get(self, name: str) -> Optional[Tensor]:
        """The finished array `name`, or None when it still has to be computed: also when
        its file is damaged (truncated, or not what its record says), with a warning."""
        if self.root is None:
            return self._memory.get(name)
        entry = self._state()["arrays"].get(name)
        file = self.root / f"{name}.npy"
        if entry is None or not file.is_file():
            return None
        try:
            shape, dtype, fortran = npy_header(file)
        except DamagedFileError as e:
            log.warning("workspace: %s; computing %s again", e, name)
            return None
        if list(shape) != entry["shape"] or str(dtype) != entry["dtype"] or fortran:
            log.warning("workspace: %s holds %s %s%s, its record says %s %s: the file is damaged; computing %s again",
                        file, dtype, shape, " (Fortran order)" if fortran else "", entry["dtype"], tuple(entry["shape"]),
                        name)
            return None
        return as_tensor(np.load(file, mmap_mode="r"))

    def fill(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
             produce: Callable[[Tensor, int, int], None]) -> Tensor:
        """Allocate `name`, let `produce(out, lo, hi)` write rows [lo, hi) of it, publish it.

        In one process lo, hi = 0, N. Under torch.distributed every rank writes its
        `shard_range` of the rows into the same file (the workspace must be on storage
        all ranks share). On disk the array is a memory map under a temporary name until
        every row is written, so a kill leaves no half-written array that a resume could
        take for finished. A full disk raises DiskFullError before any row is computed.
        """
        n = shape[0]
        if self.root is None:
            if dist.is_distributed():
                raise ValueError("a distributed fit needs a working directory every rank shares: pass checkpoint_dir")
            out = torch.empty(shape, dtype=dtype)
            produce(out, 0, n)
            self._memory[name] = out
            return out
        if self._release is not None and not self._release.alive:
            raise RuntimeError(f"the workspace in {self.root} was closed: its lock no longer keeps other runs out")
        rank, world = dist.rank_world()
        np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        final = self.root / f"{name}.npy"
        tmp = self.root / f"{TMP_PREFIX}{name}.npy"
        if rank == 0:
            try:
                np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype, shape=shape).flush()
                _reserve(tmp)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                size = np_dtype.itemsize * int(np.prod(shape))
                raise write_error(e, f"reserve {size / 2**20:.0f} MiB for {tmp.name}", self.root,
                                  "free space or choose another checkpoint_dir") from None
        dist.barrier()
        arr = np.load(tmp, mmap_mode="r+")
        try:
            produce(as_tensor(arr), *dist.shard_range(n, rank, world))
            try:
                arr.flush()
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            except OSError as e:  # storage that allocates late (NFS) can be full only now
                raise write_error(e, f"write {tmp.name}", self.root, "free space or choose another checkpoint_dir") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            del arr
        dist.barrier()
        if rank == 0:
            os.replace(tmp, final)
            state = self._state()
            state["arrays"][name] = {"shape": list(shape), "dtype": str(np_dtype)}
            try:
                self._write_state(state)
            except BaseException:
                # an array its record does not list would only be found by nothing
                final.unlink(missing_ok=True)
                raise
            log.info("workspace: wrote %s %s", final, shape)
        dist.barrier()
        return self.get(name)
