"""The extension's CUDA fused_step (csrc/fused_step.cu) against its definition, on a GPU.

tests/test_fused_step.py checks the CPU library only: nothing under tests/ runs the CUDA
kernels, since CI has no GPU. These tests do, from benchmarks/gpu/run.py (part
"tests_ext"); `pytest benchmarks/gpu/test_cuda_ext.py` runs them by hand. Without CUDA
the whole module skips. The rules are tests/test_fused_step.py's: float64 equals the
reference (autograd through `reference.fused_step`, float64, on the CPU) to round-off,
float32 errs at most 4x plain PyTorch's own float32 on the same GPU plus a floor, and
repeated calls are bitwise identical (the kernels sum with fixed trees, no atomics).
Where the CUDA part cannot be built the module skips, except under CI=1 (set by run.py on
the GPU machine), where a broken build must fail rather than pass as skipped.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from semclust import csrc, ops  # noqa: E402
from semclust.csrc import ops as ext_ops  # noqa: E402
from semclust.ops import dispatch  # noqa: E402
from semclust.ops import reference as R  # noqa: E402

# the CPU tests' inputs, runner and error measure: the CUDA kernel is held to the same ones
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from test_fused_step import CASES, FIELDS, MIN_SCALE, rel_err, run  # noqa: E402
from test_fused_step import make_inputs as _make_inputs  # noqa: E402

CUDA = torch.device("cuda")
# tests/test_fused_step.py's shapes (odd B, K = 2, K = 1000), then training-sized ones
# whose row and column sums span many blocks
SHAPES = [(7, 2, 16), (33, 10, 24), (5, 1000, 16), (64, 100, 64), (1, 3, 8), (512, 1000, 512), (4096, 100, 512)]


@pytest.fixture(scope="module", autouse=True)
def cuda_ext():
    try:
        csrc.build(cuda=True)
    except csrc.ExtensionBuildError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the CUDA part of the extension cannot be built here: {e}")


def make_inputs(b, k, d, dtype, case="random", extras=True, seed=0):
    """(logits_i, logits_t, u, v, centers, prior) on the CPU; centers and prior None
    unless `extras`."""
    return _make_inputs(b, k, d, dtype, case=case, centers=extras, prior=extras, seed=seed)


def to(inputs, device, dtype=None):
    return tuple(None if t is None else t.to(device=device, dtype=dtype or t.dtype) for t in inputs)


def outputs(r, gi, gt):
    return {**{name: getattr(r, name) for name in FIELDS}, "dlogits_i": gi, "dlogits_t": gt}


@pytest.mark.parametrize("extras", [True, False], ids=["centers+prior", "none"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("b,k,d", SHAPES)
def test_float64_on_cuda_equals_reference(b, k, d, case, extras):
    inputs = make_inputs(b, k, d, torch.float64, case, extras)
    want = outputs(*run(R.fused_step, *inputs))
    got = outputs(*run(ext_ops.fused_step, *to(inputs, CUDA)))
    assert got["loss"].device.type == "cuda"
    for name, ref in want.items():
        assert rel_err(got[name], ref) < (1e-9 if name.startswith("dlogits") else 1e-10), name


@pytest.mark.parametrize("extras", [True, False], ids=["centers+prior", "none"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("b,k,d", SHAPES)
def test_float32_on_cuda_within_pytorchs_own_error(b, k, d, case, extras):
    inputs32 = make_inputs(b, k, d, torch.float32, case, extras)
    want = outputs(*run(R.fused_step, *to(inputs32, "cpu", torch.float64)))  # the same rounded values
    torch32 = outputs(*run(R.fused_step, *to(inputs32, CUDA)))
    got = outputs(*run(ext_ops.fused_step, *to(inputs32, CUDA)))
    assert got["loss"].dtype == torch.float32 and got["dlogits_i"].dtype == torch.float32
    for name, ref in want.items():
        s = MIN_SCALE.get(name, 1e-3)
        mine, theirs = rel_err(got[name], ref, s), rel_err(torch32[name], ref, s)
        floor = 2e-5 if name.startswith("dlogits") else 2e-6  # a gradient sums K or 2K scaled terms
        assert mine <= max(4 * theirs, floor), f"{name}: ext {mine:.2e} vs torch float32 {theirs:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits_on_cuda_computed_in_float32(dtype):
    li, lt, u, v, c, pi = to(make_inputs(300, 40, 64, torch.float32), CUDA)
    li, lt = li.to(dtype), lt.to(dtype)
    got, gi, gt = run(ext_ops.fused_step, li, lt, u, v, c, pi)
    ref, gi_ref, gt_ref = run(R.fused_step, li.float(), lt.float(), u, v, c, pi)
    assert gi.dtype == dtype and gt.dtype == dtype
    assert abs(float(got.loss.detach()) - float(ref.loss.detach())) < 1e-5
    assert rel_err(gi, gi_ref) < 1e-2 and rel_err(gt, gt_ref) < 1e-2  # the cast back to half


@pytest.mark.parametrize("b,k,d", [(257, 37, 32), (4096, 1000, 512)])
def test_repeated_calls_on_cuda_are_bitwise_identical(b, k, d):
    inputs = to(make_inputs(b, k, d, torch.float32), CUDA)
    first, again = run(ext_ops.fused_step, *inputs), run(ext_ops.fused_step, *inputs)
    for x, y in zip(outputs(*first).values(), outputs(*again).values()):
        assert torch.equal(x, y)


def test_cuda_tensors_dispatch_to_ext_and_match_the_cpu_library():
    inputs = make_inputs(64, 100, 64, torch.float64)
    assert dispatch.resolve("fused_step", CUDA)[0] == "ext"
    with ops.use_backend("ext"):
        on_gpu = outputs(*run(ops.fused_step, *to(inputs, CUDA)))
        on_cpu = outputs(*run(ops.fused_step, *inputs))
    for name, ref in on_cpu.items():
        assert rel_err(on_gpu[name], ref) < 1e-10, name
