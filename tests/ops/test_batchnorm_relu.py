"""ops.batchnorm_relu against relu((h - mean) / sqrt(var + eps) * w + b) written out in
float64 here, its gradients (finite differences in float64) and nn.BatchNorm1d's rule
for the running statistics."""

from __future__ import annotations

import pytest
import torch

import semclust.ops as ops
from semclust.method.heads import ClusterHead

OPS = ("batchnorm_relu",)


def formula(h, w, b, eps=1e-5):
    """(y, batch mean, unbiased batch variance) in float64."""
    x = h.double()
    mean = x.mean(0)
    var = ((x - mean) ** 2).mean(0)
    y = torch.clamp((x - mean) / torch.sqrt(var + eps) * w.double() + b.double(), min=0)
    return y, mean, var * x.shape[0] / (x.shape[0] - 1)


def params(c, dtype=torch.float32):
    return (1 + 0.5 * torch.randn(c, dtype=torch.float64)).to(dtype), (0.3 * torch.randn(c, dtype=torch.float64)).to(dtype)


# odd shapes across the ext kernel's per-thread column ranges (>= 64 columns, multiples of
# 16); B = 2 is the smallest batch
SHAPES = [(2, 1), (2, 33), (7, 3), (64, 32), (65, 97), (300, 64), (40, 530)]


@pytest.mark.parametrize("b_,c", SHAPES)
def test_matches_formula_and_updates_running_stats(backend, h, b_, c):
    x = 3 * torch.randn(b_, c) + 1
    w, b = params(c)
    rm, rv, nb = torch.randn(c), torch.rand(c) + 0.5, torch.tensor(4)
    rm0, rv0 = rm.clone(), rv.clone()
    y = ops.batchnorm_relu(x, w, b, rm, rv, momentum=0.2, num_batches_tracked=nb)
    y64, mean, var = formula(x, w, b)
    assert y.dtype == x.dtype
    # |y| is O(|w| * max |xhat|) <= ~5 here, so the fp32 budget is scaled by 5
    h.close(y, y64, 5 * h.TOL[torch.float32], "y")
    h.close(rm, 0.8 * rm0.double() + 0.2 * mean, 5 * h.TOL[torch.float32], "running_mean")
    h.close(rv, 0.8 * rv0.double() + 0.2 * var, 20 * h.TOL[torch.float32], "running_var")
    assert int(nb) == 5


def test_cumulative_average_when_momentum_is_none(backend, h):
    x, (w, b) = torch.randn(50, 8), params(8)
    rm, rv, nb = torch.zeros(8), torch.ones(8), torch.tensor(3)
    ops.batchnorm_relu(x, w, b, rm, rv, momentum=None, num_batches_tracked=nb)
    _, mean, var = formula(x, w, b)
    h.close(rm, mean / 4, h.TOL[torch.float32], "running_mean: 1 / batches seen")
    h.close(rv, 0.75 + var / 4, h.TOL[torch.float32], "running_var")


def test_eval_uses_the_running_statistics(backend, h):
    x, (w, b) = torch.randn(9, 5), params(5)
    rm, rv = torch.randn(5), torch.rand(5) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y = ops.batchnorm_relu(x, w, b, rm, rv, training=False)
    expected = torch.clamp((x.double() - rm.double()) / torch.sqrt(rv.double() + 1e-5) * w.double() + b.double(), min=0)
    h.close(y, expected, h.TOL[torch.float32], "eval y")
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@pytest.mark.parametrize("b_,c", [(2, 3), (20, 9), (33, 40)])
def test_gradcheck_float64(backend, b_, c):
    x = (2 * torch.randn(b_, c, dtype=torch.float64)).requires_grad_()
    w, b = (t.requires_grad_() for t in params(c, torch.float64))
    assert torch.autograd.gradcheck(lambda x_, w_, b_: ops.batchnorm_relu(x_, w_, b_), (x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtypes_forward_and_gradients(backend, h, dtype):
    x = (2 * torch.randn(40, 24, dtype=torch.float64)).to(dtype).requires_grad_()
    w, b = (t.requires_grad_() for t in params(24, dtype))
    y = ops.batchnorm_relu(x, w, b)
    g = torch.randn(40, 24, dtype=torch.float64).to(dtype)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), g)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64, _, _ = formula(x64, w64, b64)
    ex, ew, eb = torch.autograd.grad(y64, (x64, w64, b64), g.double())
    assert y.dtype == gx.dtype == gw.dtype == gb.dtype == dtype
    # outputs and gradients are O(1)-O(10): the budget is the dtype's, x10 (2x the rounding rule)
    tol = 10 * h.TOL[dtype]
    h.close(y, y64, tol, "y")
    h.close(gx, ex, tol, "grad h")
    h.close(gw / 40, ew / 40, tol, "grad weight / B")
    h.close(gb / 40, eb / 40, tol, "grad bias / B")


@pytest.mark.parametrize("layout", ["contiguous", "strided", "colmajor", "offset"])
def test_layouts(backend, h, layout):
    x, (w, b) = torch.randn(37, 24), params(24)
    xl = h.layout(x, layout).requires_grad_()
    y = ops.batchnorm_relu(xl, w, b)
    h.close(y, formula(x, w, b)[0], 5 * h.TOL[torch.float32], "y")
    g = h.layout(torch.randn(37, 24), layout)  # a non-contiguous incoming gradient too
    (gx,) = torch.autograd.grad(y, xl, g)
    x64 = x.double().requires_grad_()
    (ex,) = torch.autograd.grad(formula(x64, w, b)[0], x64, g.double())
    h.close(gx, ex, 5 * h.TOL[torch.float32], "grad h")


def test_large_values_and_constant_columns(backend, h):
    """A column with one value has zero variance (y = relu(bias)); a large offset must
    not cancel (the variance is a second pass over h - mean)."""
    x = torch.randn(64, 6, dtype=torch.float64).float() + 1e3
    x[:, 2] = 5.0
    w, b = params(6)
    y = ops.batchnorm_relu(x, w, b)
    h.close(y, formula(x, w, b)[0], 1e-3, "y")
    h.close(y[:, 2], torch.relu(b[2]).expand(64), 1e-3, "constant column")


def test_bad_input_gets_a_clear_error(backend):
    x, (w, b) = torch.randn(10, 4), params(4)
    with pytest.raises(ValueError, match="at least 2 rows"):
        ops.batchnorm_relu(x[:1], w, b)
    with pytest.raises(ValueError, match=r"weight must be \[C=4\]"):
        ops.batchnorm_relu(x, w[:3], b)
    with pytest.raises(ValueError, match="running_mean and running_var"):
        ops.batchnorm_relu(x, w, b, training=False)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        ops.batchnorm_relu(x, w, b, torch.zeros(4), torch.ones(4), momentum=None)
    with pytest.raises(ValueError, match="2-D"):
        ops.batchnorm_relu(x[0], w, b)


def test_a_head_trains_as_with_torch_s_modules(backend, h):
    """ClusterHead runs BN + ReLU through the op; one training step equals nn.Sequential's
    (the module path) in outputs, parameter gradients and running statistics."""
    torch.manual_seed(0)
    head = ClusterHead(16, 7, hidden=24)
    twin = ClusterHead(16, 7, hidden=24)
    twin.load_state_dict(head.state_dict())
    x = torch.randn(50, 16)
    out, ref = head(x), twin.net(x)
    h.close(out, ref, h.TOL[torch.float32], "logits")
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, p), q in zip(head.named_parameters(), twin.parameters()):
        h.close(p.grad, q.grad, 1e-4, f"grad {name}")
    for (name, a), b in zip(head.named_buffers(), twin.buffers()):
        h.close(a.float(), b.float(), h.TOL[torch.float32], name)
    head.eval(), twin.eval()
    h.close(head(x), twin.net(x), h.TOL[torch.float32], "eval logits")


def test_a_forced_backend_without_the_op_keeps_the_modules(monkeypatch):
    """Forcing a backend that lacks batchnorm_relu (triton has no kernel for it) leaves the
    head on nn.BatchNorm1d + nn.ReLU, as for its Linear layers; forcing it on the op itself
    raises."""
    from semclust.ops import dispatch
    from semclust.ops.batchnorm_relu import covered

    calls = []
    real = ops.batchnorm_relu
    monkeypatch.setattr("semclust.method.heads.ops.batchnorm_relu", lambda *a, **k: calls.append(1) or real(*a, **k))
    head, x = ClusterHead(8, 3, hidden=6), torch.randn(10, 8)
    assert covered("cpu")  # the conftest forces torch, which implements it
    head(x)
    assert calls == [1]
    if dispatch.unavailable_reason("triton", "batchnorm_relu", torch.device("cpu")) is None:
        pytest.skip("this triton build implements batchnorm_relu")
    with ops.use_backend("triton"):
        assert not covered("cpu")
        head(x)
        assert calls == [1]
        with pytest.raises(ops.BackendUnavailable, match="batchnorm_relu"):
            ops.batchnorm_relu(x[:, :6], torch.ones(6), torch.zeros(6))
