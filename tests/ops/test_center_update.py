"""ops.center_update against W^T x with W = one_hot(labels) or probs, in float64."""

from __future__ import annotations

import pytest
import torch

import semclust.ops as ops

OPS = ("center_update",)


def formula(x, k, labels=None, probs=None, normalize=True, previous=None, momentum=0.0):
    """(centres, counts) in float64. An empty cluster: zero centre, or `previous` if given."""
    w = torch.nn.functional.one_hot(labels.long(), k).double() if labels is not None else probs.double()
    sums = w.T @ x.double()
    counts = w.sum(0)
    if normalize:
        norm = sums.norm(dim=1, keepdim=True)
        c = torch.where(norm > 0, sums / norm.clamp_min(1e-300), torch.zeros_like(sums))
    else:
        c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1e-300)[:, None], torch.zeros_like(sums))
    if previous is not None:
        prev = previous.double()
        c = torch.where(counts[:, None] <= 0, prev, momentum * prev + (1 - momentum) * c)
        if normalize:
            c = c / c.norm(dim=1, keepdim=True)
    return c, counts


def check(h, out, expected, x_dtype, n):
    centers, counts = out
    c64, n64 = expected
    assert centers.dtype == x_dtype and centers.shape == c64.shape
    assert counts.dtype == (torch.float64 if x_dtype == torch.float64 else torch.float32)
    assert counts.shape == n64.shape
    atol = h.TOL[x_dtype]
    h.close(centers, c64, atol, "centers")
    h.close(counts / n, n64 / n, h.TOL[torch.float32 if x_dtype != torch.float64 else x_dtype], "counts / n")


def soft(n, k, dtype=torch.float32):
    return torch.softmax(3 * torch.randn(n, k, dtype=torch.float64), dim=1).to(dtype)


SHAPES = [(1, 3, 1), (1, 64, 10), (7, 3, 10), (7, 64, 1), (257, 3, 10), (257, 64, 10), (200, 64, 100)]


@pytest.mark.parametrize("n,d,k", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_hard_matches_formula(backend, h, n, d, k, normalize):
    x = torch.randn(n, d)
    labels = torch.randint(k, (n,))
    out = ops.center_update(x, k, labels=labels, normalize=normalize)
    check(h, out, formula(x, k, labels=labels, normalize=normalize), x.dtype, n)
    assert out[1].sum().item() == n and torch.equal(out[1], torch.bincount(labels, minlength=k).float())


def test_hard_empty_clusters_are_zero_not_nan(backend, h):
    x = torch.randn(20, 8)
    labels = torch.randint(3, (20,)) * 2  # clusters 1, 3, 5, 6 stay empty
    for normalize in (True, False):
        centers, counts = ops.center_update(x, 7, labels=labels, normalize=normalize)
        assert bool(torch.isfinite(centers).all())
        assert counts[[1, 3, 5, 6]].tolist() == [0, 0, 0, 0]
        assert bool((centers[[1, 3, 5, 6]] == 0).all())


@pytest.mark.parametrize("n,d,k", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_soft_matches_formula(backend, h, n, d, k, normalize):
    x, probs = torch.randn(n, d), soft(n, k)
    out = ops.center_update(x, k, probs=probs, normalize=normalize)
    check(h, out, formula(x, k, probs=probs, normalize=normalize), x.dtype, n)


def test_int32_labels(backend, h):
    x = torch.randn(30, 8)
    labels = torch.randint(4, (30,), dtype=torch.int32)
    check(h, ops.center_update(x, 4, labels=labels), formula(x, 4, labels=labels), x.dtype, 30)


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_ema_and_empty_cluster_rule(backend, h, mode, normalize, momentum):
    n, d, k = 40, 16, 6
    x, previous = torch.randn(n, d), h.unit(k, d)
    if mode == "hard":
        kw = {"labels": torch.randint(4, (n,))}  # clusters 4, 5 empty
    else:
        probs = soft(n, k)
        probs[:, 5] = 0  # an empty soft cluster: its column is all zero
        kw = {"probs": probs / probs.sum(1, keepdim=True)}
    out = ops.center_update(x, k, normalize=normalize, previous=previous, momentum=momentum, **kw)
    expected = formula(x, k, normalize=normalize, previous=previous, momentum=momentum, **kw)
    check(h, out, expected, x.dtype, n)
    h.close(out[0][5], previous[5], h.TOL[torch.float32], "empty cluster keeps its previous centre")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_dtypes(backend, h, dtype, mode):
    n, d, k = 100, 64, 10
    x = h.unit(n, d, dtype)
    kw = {"labels": torch.randint(k, (n,))} if mode == "hard" else {"probs": soft(n, k, dtype)}
    check(h, ops.center_update(x, k, **kw), formula(x, k, **kw), dtype, n)


@pytest.mark.parametrize("layout", ["contiguous", "strided", "colmajor", "offset"])
def test_layouts(backend, h, layout):
    n, d, k = 37, 24, 5
    x, probs, labels = torch.randn(n, d), soft(n, k), torch.randint(k, (n,))
    check(h, ops.center_update(h.layout(x, layout), k, labels=labels), formula(x, k, labels=labels), x.dtype, n)
    out = ops.center_update(h.layout(x, layout), k, probs=h.layout(probs, layout))
    check(h, out, formula(x, k, probs=probs), x.dtype, n)
    strided_labels = torch.stack([labels, labels], 1)[:, 0]
    assert not strided_labels.is_contiguous()
    check(h, ops.center_update(x, k, labels=strided_labels), formula(x, k, labels=labels), x.dtype, n)


def test_big_torch_only(h):
    n, d, k = 20_000, 64, 300
    x, labels = torch.randn(n, d), torch.randint(k, (n,))
    check(h, ops.center_update(x, k, labels=labels), formula(x, k, labels=labels), x.dtype, n)


# --- gradients ----------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_previous", [False, True])
def test_gradcheck_soft(backend, normalize, with_previous):
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    probs = torch.softmax(torch.randn(6, 3, dtype=torch.float64), 1).requires_grad_()
    kw = {"previous": torch.randn(3, 4, dtype=torch.float64), "momentum": 0.5} if with_previous else {}

    def f(x, probs):
        return ops.center_update(x, 3, probs=probs, normalize=normalize, **kw)

    assert torch.autograd.gradcheck(f, (x, probs))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_grad_soft_matches_formula(backend, h, normalize, dtype):
    """Gradients for a random upstream gradient vs autograd through the fp64 formula."""
    x, probs = torch.randn(40, 16).to(dtype), soft(40, 7, dtype)
    gc, gn = torch.randn(7, 16), torch.randn(7)
    xa, pa = x.clone().requires_grad_(), probs.clone().requires_grad_()
    c, n = ops.center_update(xa, 7, probs=pa, normalize=normalize)
    ((c * gc).sum() + (n * gn).sum()).backward()
    assert xa.grad.dtype == dtype and pa.grad.dtype == dtype
    xb, pb = x.double().requires_grad_(), probs.double().requires_grad_()
    c, n = formula(xb, 7, probs=pb, normalize=normalize)
    ((c * gc.double()).sum() + (n * gn.double()).sum()).backward()
    h.close(xa.grad, xb.grad, h.TOL[dtype] * float(xb.grad.abs().max()), "dx")
    h.close(pa.grad, pb.grad, h.TOL[dtype] * float(pb.grad.abs().max()), "dprobs")


# --- errors -------------------------------------------------------------------------


def test_exactly_one_of_labels_and_probs():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="exactly one"):
        ops.center_update(x, 2)
    with pytest.raises(ValueError, match="exactly one"):
        ops.center_update(x, 2, labels=torch.zeros(5, dtype=torch.long), probs=torch.full((5, 2), 0.5))


@pytest.mark.parametrize("bad", [-1, 3])
def test_labels_out_of_range(bad):
    labels = torch.zeros(5, dtype=torch.long)
    labels[2] = bad
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        ops.center_update(torch.randn(5, 3), 3, labels=labels)


def test_rejects_bad_input():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="1-D tensor of 5"):
        ops.center_update(x, 3, labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="1-D tensor of 5"):
        ops.center_update(x, 3, labels=torch.zeros(5, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="int32/int64"):
        ops.center_update(x, 3, labels=torch.zeros(5))
    with pytest.raises(ValueError, match="probs has dim 2 but 3"):
        ops.center_update(x, 3, probs=torch.full((5, 2), 0.5))
    with pytest.raises(ValueError, match="probs has 4 rows but x has 5"):
        ops.center_update(x, 3, probs=torch.full((4, 3), 1 / 3))
    with pytest.raises(ValueError, match="k must be"):  # K < 1
        ops.center_update(x, 0, labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="previous has 2 centres"):
        ops.center_update(x, 3, labels=torch.zeros(5, dtype=torch.long), previous=torch.randn(2, 3))
    with pytest.raises(ValueError, match="previous has dim 4 but 3"):
        ops.center_update(x, 3, labels=torch.zeros(5, dtype=torch.long), previous=torch.randn(3, 4))
    for m in (1.0, -0.1):
        with pytest.raises(ValueError, match="momentum"):
            ops.center_update(x, 3, labels=torch.zeros(5, dtype=torch.long), previous=torch.randn(3, 3), momentum=m)
    bad = x.clone()
    bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match="x has 1 row"):
        ops.center_update(bad, 3, labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="x must be 2-D"):
        ops.center_update(x[None], 3, labels=torch.zeros(5, dtype=torch.long))
    nan_p = torch.full((5, 3), 1 / 3)
    nan_p[0, 0] = float("nan")
    with pytest.raises(ValueError, match="probs has 1 row"):
        ops.center_update(x, 3, probs=nan_p)
