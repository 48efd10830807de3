"""ops.balance against the marginal, entropy and KL written out in float64."""

from __future__ import annotations

import math

import pytest
import torch

import semclust.ops as ops

OPS = ("balance",)


def formula(p, weights=None):
    """(marginal m, -sum_k w_k m_k log m_k, log K + sum_k m_k log m_k) with 0 log 0 = 0.

    The KL is written as the docstring defines it: log K is a constant, so off the simplex
    its gradient differs from that of sum_k m_k log(K m_k) by log K / N per entry (no
    difference through a softmax).
    """
    m = p.double().mean(0)
    plogp = torch.xlogy(m, m)
    w = torch.ones_like(m) if weights is None else weights.double()
    return m, -(w * plogp).sum(), math.log(m.shape[0]) + plogp.sum()


def check(h, r, p, dtype, weights=None):
    m, ent, kl = formula(p, weights)
    k = m.shape[0]
    atol = h.TOL[dtype]
    h.close(r.marginal, m, atol, "marginal")
    # entropy and KL are sums of K terms bounded by log K (times the weights)
    scale = max(1.0, math.log(k)) * (1.0 if weights is None else float(weights.abs().max()))
    h.close(r.entropy, ent, atol * scale, "entropy")
    h.close(r.kl, kl, atol * max(1.0, math.log(k)), "kl")
    assert r.entropy.shape == () and r.kl.shape == () and r.marginal.shape == (k,)


def probs(n, k, dtype=torch.float32, sharp=3.0):
    return torch.softmax(sharp * torch.randn(n, k, dtype=torch.float64), dim=1).to(dtype)


@pytest.mark.parametrize("n,k", [(1, 1), (1, 10), (7, 10), (257, 10), (257, 100), (7, 1)])
@pytest.mark.parametrize("weighted", [False, True])
def test_probs_and_colsum_match_formula(backend, h, n, k, weighted):
    p = probs(n, k)
    w = torch.rand(k) * 2 if weighted else None
    r = ops.balance(p, weights=w)
    check(h, r, p, torch.float32, w)
    # the same statistics from the column sums that assign() emits
    r2 = ops.balance(p.double().sum(0).float(), n=n, weights=w)
    check(h, r2, p, torch.float32, w)
    if k == 1:  # one cluster: certain and perfectly "balanced"
        assert float(r.entropy) == pytest.approx(0, abs=1e-6) and float(r.kl) == pytest.approx(0, abs=1e-6)


def test_uniform_and_collapsed_extremes(backend, h):
    k = 8
    uniform = torch.full((30, k), 1.0 / k)
    r = ops.balance(uniform)
    assert float(r.entropy) == pytest.approx(math.log(k), abs=1e-5)
    assert float(r.kl) == pytest.approx(0.0, abs=1e-5)
    collapsed = torch.zeros(30, k)
    collapsed[:, 3] = 1.0  # every row in cluster 3; 7 empty clusters (0 log 0 = 0)
    r = ops.balance(collapsed)
    assert bool(torch.isfinite(r.entropy)) and bool(torch.isfinite(r.kl))
    assert float(r.entropy) == pytest.approx(0.0, abs=1e-6)
    assert float(r.kl) == pytest.approx(math.log(k), abs=1e-5)


def test_empty_cluster_has_finite_gradient(backend, h):
    p = probs(20, 5, torch.float64)
    p[:, 2] = 0
    p = (p / p.sum(1, keepdim=True)).requires_grad_()
    r = ops.balance(p)
    check(h, r, p, torch.float64)
    r.entropy.backward()
    # d(-m log m)/dm is +inf at m = 0; the op must keep it finite (a large push up)
    assert bool(torch.isfinite(p.grad).all())
    assert bool((p.grad[:, 2] > 0).all())
    # elsewhere it is the formula's: d/dp_ik of -sum_k m_k log m_k = -(log m_k + 1) / N
    keep = [0, 1, 3, 4]
    m = p.detach().mean(0)[keep]
    torch.testing.assert_close(p.grad[:, keep], (-(m.log() + 1) / 20).expand(20, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(backend, h, dtype):
    p = probs(100, 10, dtype)
    check(h, ops.balance(p), p, dtype)
    w = torch.rand(10).to(dtype)
    check(h, ops.balance(p, weights=w), p, dtype, w)


@pytest.mark.parametrize("layout", ["contiguous", "strided", "colmajor", "offset"])
def test_layouts(backend, h, layout):
    p = probs(37, 9)
    check(h, ops.balance(h.layout(p, layout)), p, torch.float32)
    colsum = torch.stack([p.sum(0), p.sum(0)], 1)[:, 0]  # a strided 1-D view
    check(h, ops.balance(colsum, n=37), p, torch.float32)


def test_big_torch_only(h):
    p = probs(100_000, 50)
    check(h, ops.balance(p), p, torch.float32)


# --- gradients ----------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("which", ["entropy", "kl", "marginal"])
def test_gradcheck_probs(backend, weighted, which):
    p = torch.softmax(torch.randn(6, 4, dtype=torch.float64), 1).requires_grad_()
    w = torch.rand(4, dtype=torch.float64) + 0.5 if weighted else None
    assert torch.autograd.gradcheck(lambda p: getattr(ops.balance(p, weights=w), which), (p,))


@pytest.mark.parametrize("weighted", [False, True])
def test_gradcheck_colsum(backend, weighted):
    colsum = (torch.softmax(torch.randn(6, 4, dtype=torch.float64), 1).sum(0)).requires_grad_()
    w = torch.rand(4, dtype=torch.float64) + 0.5 if weighted else None
    assert torch.autograd.gradcheck(lambda c: ops.balance(c, n=6, weights=w)[1:], (colsum,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_grad_matches_formula(backend, h, dtype):
    p, w = probs(40, 7, dtype), torch.rand(7) + 0.5
    ga, gb = torch.randn(()), torch.randn(())
    pa = p.clone().requires_grad_()
    r = ops.balance(pa, weights=w)
    (ga * r.entropy + gb * r.kl).backward()
    pb = p.double().requires_grad_()
    _, ent, kl = formula(pb, w)
    (ga * ent + gb * kl).backward()
    h.close(pa.grad, pb.grad, h.TOL[dtype] * float(pb.grad.abs().max()), "dprobs")


# --- errors -------------------------------------------------------------------------


def test_rejects_bad_input():
    p = probs(5, 3)
    bad = p.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.balance(bad)
    with pytest.raises(ValueError, match="needs n"):
        ops.balance(p.sum(0))
    with pytest.raises(ValueError, match="needs n"):
        ops.balance(p.sum(0), n=0)
    with pytest.raises(ValueError, match="probs"):
        ops.balance(p[None])  # 3-D
    with pytest.raises(ValueError, match="probs"):
        ops.balance(torch.tensor(1.0))  # 0-D
    with pytest.raises(ValueError, match="float tensor"):
        ops.balance(torch.ones(5, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):  # K < 1
        ops.balance(torch.empty(5, 0))
    with pytest.raises(ValueError, match=r"weights must be \[K=3\]"):
        ops.balance(p, weights=torch.ones(4))
    with pytest.raises(ValueError, match=r"weights must be \[K=3\]"):
        ops.balance(p, weights=torch.ones(3, 1))
