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
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from . import distributed as dist
from .files import TMP_PREFIX, atomic_write
from .mmap import as_tensor

log = logging.getLogger(__name__)

STATE = "workspace.json"
FORMAT = "semclust-workspace/1"


def _reserve(path: Path) -> None:
    """Give the (sparse) file all its blocks now: a full disk is an OSError here, not a
    SIGBUS later when a write through the memory map finds no block."""
    if not hasattr(os, "posix_fallocate"):
        return
    size = path.stat().st_size
    try:
        with open(path, "rb+") as f:
            os.posix_fallocate(f.fileno(), 0, size)
    except OSError as e:
        path.unlink(missing_ok=True)
        raise OSError(e.errno, f"cannot reserve {size / 2**20:.0f} MiB for {path.name} in {path.parent}: "
                               f"{e.strerror}; free space or choose another checkpoint_dir") from None


class Workspace:
    """Per-row arrays of one fit run, in memory (``root=None``) or memory-mapped files."""

    def __init__(self, root: Optional[Union[str, os.PathLike]], run: str = "", fresh: bool = False) -> None:
        self.root = None if root is None else Path(root)
        self.run = run
        self._memory: dict[str, Tensor] = {}
        if self.root is None:
            return
        if dist.is_distributed():
            # rank 0 sets the directory up; the others wait and then read what it wrote
            if torch.distributed.get_rank() == 0:
                self._open(run, fresh)
            dist.barrier()
            if self._state().get("run") != run:
                raise ValueError(f"{self.root} was set up for another run by rank 0: is it on storage every rank shares?")
            return
        self._open(run, fresh)

    def _open(self, run: str, fresh: bool) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        state = self._state()
        if state and state.get("run") != run and not fresh:
            raise ValueError(
                f"cannot resume: {self.root} holds the working files of another run (other data, K, seed or "
                "settings); delete it or start without resume")
        if fresh or state is None or state.get("run") != run:
            for name in (state or {}).get("arrays", {}):
                (self.root / f"{name}.npy").unlink(missing_ok=True)
            self._write_state({"format": FORMAT, "run": run, "arrays": {}})

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
        return state

    def _write_state(self, state: dict[str, Any]) -> None:
        blob = json.dumps(state, indent=1).encode()
        atomic_write(self.root / STATE, lambda f: f.write(blob))

    def path(self, name: str) -> Optional[Path]:
        """Where a file `name` of this run goes (checkpoints); None in memory."""
        return None if self.root is None else self.root / name

    def get(self, name: str) -> Optional[Tensor]:
        """The finished array `name`, or None when it still has to be computed."""
        if self.root is None:
            return self._memory.get(name)
        entry = self._state()["arrays"].get(name)
        file = self.root / f"{name}.npy"
        if entry is None or not file.is_file():
            return None
        arr = np.load(file, mmap_mode="r")
        if list(arr.shape) != entry["shape"] or str(arr.dtype) != entry["dtype"]:
            raise ValueError(f"{file} has shape {arr.shape} {arr.dtype}, its record says {entry}: the workspace is damaged")
        return as_tensor(arr)

    def fill(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
             produce: Callable[[Tensor, int, int], None]) -> Tensor:
        """Allocate `name`, let `produce(out, lo, hi)` write rows [lo, hi) of it, publish it.

        In one process lo, hi = 0, N. Under torch.distributed every rank writes its
        `shard_range` of the rows into the same file (the workspace must be on storage
        all ranks share). On disk the array is a memory map under a temporary name until
        every row is written, so a kill leaves no half-written array that a resume could
        take for finished.
        """
        n = shape[0]
        if self.root is None:
            if dist.is_distributed():
                raise ValueError("a distributed fit needs a working directory every rank shares: pass checkpoint_dir")
            out = torch.empty(shape, dtype=dtype)
            produce(out, 0, n)
            self._memory[name] = out
            return out
        rank, world = dist.rank_world()
        np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        final = self.root / f"{name}.npy"
        tmp = self.root / f"{TMP_PREFIX}{name}.npy"
        if rank == 0:
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype, shape=shape).flush()
            _reserve(tmp)
        dist.barrier()
        arr = np.load(tmp, mmap_mode="r+")
        try:
            produce(as_tensor(arr), *dist.shard_range(n, rank, world))
            arr.flush()
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
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
            self._write_state(state)
            log.info("workspace: wrote %s %s", final, shape)
        dist.barrier()
        return self.get(name)
