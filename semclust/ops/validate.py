"""Input checks at the public edge of the ops; kernels assume validated input."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def matrix(name: str, t: object, cols: int | None = None, finite: bool = True) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}; convert with torch.as_tensor")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    if cols is not None and t.shape[1] != cols:
        raise ValueError(f"{name} has dim {t.shape[1]} but {cols} was expected (image and text features must share D)")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows)")
    if finite:
        finite_(name, t)
    return t


def finite_(name: str, t: Tensor, chunk_rows: int = 65536) -> None:
    # row chunks: a memory-mapped [N, D] input must not become an [N, D] bool mask
    rows = t if t.dim() > 1 else t[:, None]
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    bad = 0
    for s in range(0, rows.shape[0], chunk_rows):
        chunk = rows[s : s + chunk_rows]
        # A sum is finite only if every term is (inf + x = inf, inf - inf = nan, nan + x =
        # nan): one streaming read, several times cheaper than an isfinite mask. A finite
        # chunk whose sum overflows takes the exact test below and passes it.
        if bool(torch.isfinite(chunk.sum(dtype=acc))):
            continue
        ok = torch.isfinite(chunk)
        if not bool(ok.all()):
            bad += int((~ok).any(dim=-1).sum()) if t.dim() > 1 else int((~ok).sum())
    if bad:
        raise ValueError(f"{name} has {bad} row(s) with NaN or Inf; drop or repair them before clustering")


def unit_rows(x: Tensor, chunk_size: int, tol: float = 2e-3) -> bool:
    """True when every row has norm 1 (to `tol`), read `chunk_size` rows at a time."""
    # fp16 storage rounds a unit norm by up to ~1e-3
    return all(
        bool(((x[s : s + chunk_size].float().norm(dim=1) - 1).abs() <= tol).all()) for s in range(0, x.shape[0], chunk_size)
    )


def same_device(**ts: Tensor) -> None:
    devs = {n: t.device for n, t in ts.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise ValueError(f"inputs are on different devices: {devs}; move them to one device")


def positive(name: str, v: float) -> float:
    if not (v > 0) or v != v or v == float("inf"):
        raise ValueError(f"{name} must be a finite positive number, got {v}")
    return float(v)


def count(name: str, v: int, low: int, high: int | None = None, what: str = "") -> int:
    if not isinstance(v, numbers.Integral) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    v = int(v)
    if v < low or (high is not None and v > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {rng}{what}, got {v}")
    return v


def labels(name: str, t: Tensor, n: int, k: int) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D tensor of {n} cluster ids")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32/int64, got {t.dtype}")
    if n and (int(t.min()) < 0 or int(t.max()) >= k):
        raise ValueError(f"{name} must lie in [0, {k}), got range [{int(t.min())}, {int(t.max())}]")
    # contiguous: a kernel indexes labels by row number, whatever view the caller passed
    return t.long().contiguous()
