"""Shared helpers of the Triton kernel tests: devices, dtypes, layouts, tolerances.

Correctness rule for fp16/bf16 (flash-attention's): against a float64 reference computed
on the same (rounded) inputs, the kernel's error may be at most 2x the error of the same
math done in plain PyTorch at the low precision, plus a small absolute slack. fp32 is
compared with fixed tolerances.
"""

from __future__ import annotations

import pytest
import torch

import semclust.ops as ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

BF16 = pytest.param(
    torch.bfloat16, id="bf16",
    marks=pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="bf16 needs CUDA: the Triton interpreter's bf16 arithmetic is wrong on CPU"),
)
FP32 = pytest.param(torch.float32, id="fp32")
FP16 = pytest.param(torch.float16, id="fp16")
DTYPES = [FP32, FP16, BF16]
LOW = (torch.float16, torch.bfloat16)
LAYOUTS = ["contiguous", "transposed", "offset"]

# fp32 tolerances (atol, rtol) of a kernel against the reference
FP32_TOL = dict(atol=2e-5, rtol=2e-5)


def triton_backend():
    return ops.use_backend("triton")


def make(n: int, d: int, dtype=torch.float32, layout: str = "contiguous", normalize: bool = True,
         seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """[n, d] rows on DEVICE in `layout`: contiguous, a transposed (column-major) view, or an
    offset view inside a larger buffer (nonzero storage offset, row stride > d)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    if normalize:
        t = torch.nn.functional.normalize(t, dim=1)
    t = t.to(dtype)
    if layout == "contiguous":
        out = t.clone()
    elif layout == "transposed":
        out = t.T.contiguous().T
        assert not out.is_contiguous() or n == 1 or d == 1
    elif layout == "offset":
        big = torch.zeros(n + 3, d + 5, dtype=dtype)
        big[2 : 2 + n, 1 : 1 + d] = t
        out = big[2 : 2 + n, 1 : 1 + d]
        assert out.storage_offset() > 0
    else:
        raise ValueError(layout)
    return out.to(DEVICE)


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def assert_lowp(kernel: torch.Tensor, ref64: torch.Tensor, naive: torch.Tensor, slack: float, what: str) -> None:
    """flash-attention's rule: err(kernel) <= 2 err(plain torch at low precision) + slack.

    Where the plain low-precision math breaks down (NaN/Inf, e.g. normalising an empty
    cluster's zero sum with an eps that underflows in fp16) it sets no yardstick: there
    the kernel must be within `slack` of the reference.
    """
    naive = torch.where(torch.isfinite(naive), naive.double(), ref64.double())
    ek, en = err(kernel, ref64), err(naive, ref64)
    assert ek <= 2 * en + slack, f"{what}: kernel error {ek:.3g} > 2 x torch low-precision error {en:.3g} + {slack}"


def assert_fp32(kernel: torch.Tensor, ref: torch.Tensor, what: str, atol: float = FP32_TOL["atol"],
                rtol: float = FP32_TOL["rtol"]) -> None:
    torch.testing.assert_close(kernel.double(), ref.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
