"""Triton-backend `balance` (a thin torch computation) and its fusion with `assign`."""

import pytest

pytest.importorskip("triton", reason="the triton backend's tests need the triton package (pip install triton)")

import torch  # noqa: E402

import semclust.ops as ops  # noqa: E402
from semclust.ops import reference  # noqa: E402

from kernel_util import DEVICE, assert_fp32, make, triton_backend  # noqa: E402


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("form", ["probs", "colsum"])
def test_matches_reference(form, weighted):
    p = torch.softmax(make(23, 9, normalize=False, seed=1), 1)
    p[:, 3] = 0.0  # an empty cluster: x log x -> 0 and a finite gradient
    w = torch.rand(9, generator=torch.Generator().manual_seed(2)).to(DEVICE) if weighted else None
    t = p if form == "probs" else p.sum(0)
    n = None if form == "probs" else 23
    tk, tr = t.clone().requires_grad_(), t.clone().requires_grad_()
    with triton_backend():
        a = ops.balance(tk, n=n, weights=w)
    b = reference.balance(tr, n=n, weights=w)
    for u, v, name in zip(a, b, ("marginal", "entropy", "kl")):
        assert_fp32(u, v, name, atol=1e-7, rtol=1e-6)
    (ga,) = torch.autograd.grad(a.entropy + 2 * a.kl, (tk,))
    (gb,) = torch.autograd.grad(b.entropy + 2 * b.kl, (tr,))
    assert torch.isfinite(ga).all()
    assert_fp32(ga, gb, "gradient", atol=1e-6, rtol=1e-5)


def test_fused_with_assign_colsum():
    """balance(assign(...).colsum, n) equals balance of the full P, without forming P."""
    x, c = make(40, 16, seed=3), make(11, 16, seed=4)
    with triton_backend():
        out = ops.assign(x, c, 0.1, return_probs=True)
        from_colsum = ops.balance(out.colsum, n=40)
        from_probs = ops.balance(out.probs)
    for u, v, name in zip(from_colsum, from_probs, ("marginal", "entropy", "kl")):
        assert_fp32(u, v, name, atol=1e-6, rtol=1e-5)
