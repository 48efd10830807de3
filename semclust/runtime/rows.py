"""One chunked pass over rows: the loop every per-row phase of a fit shares.

`fill(ws, name, shape, dtype, block, ...)` returns the workspace array `name` when a
finished one exists (a resumed run), else allocates it and writes this rank's rows
(`Workspace.fill` gives the rank share) `chunk` rows at a time as `block(lo, hi)`,
releasing the pages of the output and of the arrays it reads after each chunk and
advancing one progress bar. The method supplies only `block`, the math of a row block.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .mmap import release
from .workspace import Workspace


def fill(ws: Workspace, name: str, shape: tuple[int, ...], dtype: torch.dtype, block: Callable[[int, int], Tensor], *,
         chunk: int, reads: Sequence[Tensor] = (), desc: str = "", unit: str = "row", progress: bool = False) -> Tensor:
    """The array `name` [shape] of `dtype`: reused when finished, else filled row block by
    row block from `block(lo, hi) -> [hi - lo, ...]` (any device and dtype; converted)."""
    got = ws.get(name)
    if got is not None:
        return got

    def produce(out: Tensor, lo: int, hi: int) -> None:
        with tqdm(total=hi - lo, desc=desc or name, unit=unit, unit_scale=True, disable=not progress, leave=False) as bar:
            for s in range(lo, hi, chunk):
                e = min(s + chunk, hi)
                out[s:e] = block(s, e).to(device=out.device, dtype=out.dtype)
                # a sequential pass: the rows done need not stay resident
                release(out, *reads)
                bar.update(e - s)

    return ws.fill(name, shape, dtype, produce)
