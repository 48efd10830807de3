"""Shared fixtures for the op tests: the backend matrix, the dtype error budget, inputs.

Every op test compares the public op with a naive float64 formula written in the test
itself (never with `semclust.ops.reference`). Tests that take the `backend` fixture run
once per backend usable on CPU in this run, so a Triton or extension backend that
registers itself is tested automatically; their shapes stay small (N <= 300, D <= 64,
K <= 100) because Triton runs in an interpreter on CPU. Bigger shapes are torch-only.

Helpers reach the tests through the `h` fixture (a conftest is not an importable module
once two of them share the name).
"""

from __future__ import annotations

import types
import zlib

import pytest
import torch

import semclust.ops as ops
from semclust.ops import dispatch

CPU = torch.device("cpu")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "strided", "colmajor", "offset")


def _backends_on_cpu() -> list[str]:
    avail = ops.available_backends("cpu")
    return ["torch"] + [b for b in ("triton", "ext") if avail[b] is None]


BACKENDS = _backends_on_cpu()


@pytest.fixture(autouse=True)
def _isolated_state(request, monkeypatch):
    """Each test starts on the torch backend with its own seed and leaves no state behind.

    The backend fixture (or a test) may force another backend inside; the context
    manager puts back whatever was forced before the test, even if the test fails.
    """
    monkeypatch.delenv("SEMCLUST_BACKEND", raising=False)
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    with ops.use_backend("torch"):
        yield


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test under each backend usable on CPU; skip a backend lacking the module's ops.

    A test module lists the ops it exercises in `OPS`; a backend that registers only some
    ops (the extension implements the training step, not every op) is skipped for the
    others rather than failing with BackendUnavailable.
    """
    name = request.param
    for op in getattr(request.module, "OPS", ()):
        reason = dispatch.unavailable_reason(name, op, CPU)
        if reason is not None:
            pytest.skip(f"{name}: {reason}")
    with ops.use_backend(name):
        yield name


# --- error budget -------------------------------------------------------------------
# Absolute error allowed on O(1) outputs (probabilities, unit-vector components, cosines,
# entropies / log K) per *input* dtype. The float64 formula runs on the same, already
# rounded inputs, so input rounding is not counted; only the op's own arithmetic is.
# Tests use tau = 0.1 unless they say otherwise, so a logit carries 10x the error of a dot
# product; a softmax passes at most ~1/2 of a logit error on to a probability.
#   fp64: eps 2.2e-16; D <= 64-term sums x 10 -> ~1e-13; 1e-10 leaves room for chunked sums.
#   fp32: eps 1.2e-7; a kernel accumulating in fp32 loses ~sqrt(D) ulps per dot, x10 -> ~1e-5.
#   fp16 / bf16: a backend may round a dot product (or an fp16 output) to the input
#   precision: eps/2 = 4.9e-4 (fp16) / 3.9e-3 (bf16), x10 on a logit, /2 on a probability
#   -> ~2.5e-3 / 2e-2; the budget is twice that.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def tol(dtype: torch.dtype, tau: float = 0.1) -> float:
    """Budget for outputs of a softmax at temperature `tau` (scaled from the tau=0.1 table)."""
    return TOL[dtype] * max(1.0, 0.1 / tau)


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float, msg: str = "") -> None:
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert bool(torch.isfinite(actual).all()), f"{msg} has NaN/Inf"
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), atol=atol, rtol=0, msg=msg or None)


def assert_argmax(labels: torch.Tensor, scores64: torch.Tensor, atol: float) -> None:
    """labels[i] is an argmax of row i of the float64 scores, up to `atol` near-ties.

    Outside near-ties this forces labels == scores64.argmax(1) exactly.
    """
    assert labels.dtype == torch.int64 and labels.shape == scores64.shape[:1]
    picked = scores64.gather(1, labels[:, None]).squeeze(1)
    worst = float((scores64.max(1).values - picked).max())
    assert worst <= atol, f"a label is {worst:.3g} below its row's max (allowed {atol:.3g})"


def unit(n: int, d: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n random L2-normalised rows (normalised in float64, then rounded to dtype)."""
    return torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype)


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as `t` in another memory layout."""
    n, d = t.shape
    if kind == "contiguous":
        return t.contiguous()
    if kind == "strided":  # every other row of a bigger buffer
        big = torch.full((2 * n, d), float("nan"), dtype=t.dtype)
        big[::2] = t
        out = big[::2]
    elif kind == "colmajor":  # stride (1, n)
        out = t.T.contiguous().T
    elif kind == "offset":  # storage starts 3 rows in (garbage in front)
        big = torch.full((n + 3, d), float("nan"), dtype=t.dtype)
        big[3:] = t
        out = big[3:]
        assert out.storage_offset() == 3 * d
    else:
        raise ValueError(kind)
    if kind != "offset" and n > 1 and d > 1:
        assert not out.is_contiguous()
    assert torch.equal(out, t)
    return out


@pytest.fixture
def h():
    return types.SimpleNamespace(
        TOL=TOL, tol=tol, close=close, assert_argmax=assert_argmax, unit=unit, layout=layout,
    )
