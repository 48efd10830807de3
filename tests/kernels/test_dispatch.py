"""Dispatch of the Triton backend: forced use, and the reasons when it cannot run."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="the triton backend's tests need the triton package (pip install triton)")


import semclust.kernels  # noqa: E402
import semclust.ops as ops  # noqa: E402
from semclust.ops import dispatch  # noqa: E402

from kernel_util import DEVICE  # noqa: E402

OPS = ("assign", "retrieve", "knn", "center_update", "balance")


@pytest.mark.parametrize("op", OPS)
def test_forced_triton_is_picked(op):
    with ops.use_backend("triton"):
        name, impl = dispatch.resolve(op, DEVICE)
    assert name == "triton"
    assert impl is getattr(getattr(semclust.kernels, op), op)


def test_triton_is_available_where_it_can_run():
    assert ops.available_backends(DEVICE)["triton"] is None


def _python(code: str, drop_env=("TRITON_INTERPRET",), extra_env=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in drop_env}
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU-only process, as on a machine without a GPU
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=120)


def test_cpu_without_interpreter_is_unavailable_with_a_reason():
    r = _python("""
        import torch, semclust.ops as ops
        reason = ops.available_backends("cpu")["triton"]
        print("REASON", reason)
        try:
            with ops.use_backend("triton"):
                ops.assign(torch.randn(3, 4), torch.randn(2, 4), 0.1)
        except ops.BackendUnavailable as e:
            print("RAISED", e)
        with ops.use_backend("torch"):
            print("TORCH", ops.assign(torch.randn(3, 4), torch.randn(2, 4), 0.1).labels.shape)
    """)
    assert r.returncode == 0, r.stderr
    assert "REASON triton kernels run on CUDA tensors" in r.stdout and "TRITON_INTERPRET=1" in r.stdout
    assert "RAISED backend 'triton' was forced but cannot run assign" in r.stdout
    assert "TORCH torch.Size([3])" in r.stdout


@pytest.mark.parametrize("error", ["ModuleNotFoundError", "ImportError"], ids=["missing", "broken"])
def test_missing_or_broken_triton_is_reported_as_needs_triton(error):
    r = _python(f"""
        import sys
        import torch  # torch probes for triton itself when imported; block it afterwards
        for m in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
            del sys.modules[m]
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise {error}(f"cannot import {{name!r}}", name=name)
        sys.meta_path.insert(0, Block())
        import semclust.ops as ops
        print("REASON", ops.available_backends("cpu")["triton"])
    """, drop_env=())
    assert r.returncode == 0, r.stderr
    assert "REASON the triton backend needs 'triton'" in r.stdout
