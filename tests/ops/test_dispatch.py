"""Backend choice: use_backend, SEMCLUST_BACKEND, unavailable and unknown backends."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import semclust.ops as ops
from semclust.ops import dispatch

CPU = torch.device("cpu")


def active(op: str = "assign") -> str:
    """The backend an op would run on for CPU tensors right now."""
    return dispatch.resolve(op, CPU)[0]


def unavailable_on_cpu() -> list[tuple[str, str]]:
    return [(b, r) for b, r in ops.available_backends("cpu").items() if r is not None]


def test_available_backends_shape():
    avail = ops.available_backends()
    assert set(avail) == {"torch", "triton", "ext"}
    assert avail["torch"] is None
    for name, reason in avail.items():
        assert reason is None or (isinstance(reason, str) and reason), name
    assert ops.available_backends(torch.device("cpu")) == avail


def test_resolved_backends_names_what_each_op_runs_on():
    with ops.use_backend(None):
        auto = ops.resolved_backends("cpu")
        assert set(auto) == set(dispatch._IMPLS["torch"]) and {"assign", "knn", "fused_step"} <= set(auto)
        assert auto == {op: active(op) for op in auto}
        # the automatic choice skips a backend that cannot run (e.g. an extension not built for these sources)
        for op, b in auto.items():
            assert dispatch.unavailable_reason(b, op, CPU) is None
    with ops.use_backend("torch"):
        assert set(ops.resolved_backends(CPU).values()) == {"torch"}
    with ops.use_backend("triton"):  # on CPU without TRITON_INTERPRET: named, not raised
        if ops.available_backends("cpu")["triton"] is not None:
            assert set(ops.resolved_backends("cpu").values()) == {"triton (cannot run it)"}


def test_use_backend_call_form_persists():
    with ops.use_backend(None):  # this test's own scope (the autouse fixture forced torch)
        assert dispatch.forced() is None
        ops.use_backend("torch")  # call form: in force until changed
        assert dispatch.forced() == "torch" and active() == "torch"
        ops.use_backend(None)
        assert dispatch.forced() is None
    assert dispatch.forced() == "torch"


def test_use_backend_context_restores_previous():
    with ops.use_backend(None):
        with ops.use_backend("torch"):
            assert dispatch.forced() == "torch"
            with ops.use_backend(None):
                assert dispatch.forced() is None
            assert dispatch.forced() == "torch"  # the inner block put back the outer choice
        assert dispatch.forced() is None
        ops.use_backend("torch")
        with ops.use_backend(None):
            pass
        assert dispatch.forced() == "torch"  # restores a call-form choice too


def test_use_backend_restores_on_exception():
    with ops.use_backend(None):
        with pytest.raises(KeyError):
            with ops.use_backend("torch"):
                raise KeyError("boom")
        assert dispatch.forced() is None


def test_use_backend_is_per_thread():
    seen = {}
    with ops.use_backend("torch"):
        t = threading.Thread(target=lambda: seen.setdefault("other", dispatch.forced()))
        t.start()
        t.join()
    assert seen["other"] is None


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        ops.use_backend("cuda")
    assert dispatch.forced() == "torch"  # a refused name changes nothing


def test_env_forces_backend(monkeypatch):
    with ops.use_backend(None):
        monkeypatch.setenv("SEMCLUST_BACKEND", "torch")
        assert dispatch.forced() == "torch" and active() == "torch"
        x, c = torch.randn(5, 3), torch.randn(2, 3)
        r = ops.assign(x, c, 0.5)
        torch.testing.assert_close(r.conf, torch.softmax(x @ c.T / 0.5, 1).max(1).values)
        monkeypatch.setenv("SEMCLUST_BACKEND", "")  # empty means automatic
        assert dispatch.forced() is None


def test_use_backend_overrides_env(monkeypatch):
    monkeypatch.setenv("SEMCLUST_BACKEND", "no-such-backend")
    with ops.use_backend("torch"):
        assert active() == "torch"


def test_unknown_env_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("SEMCLUST_BACKEND", "cuda")
    with ops.use_backend(None):
        with pytest.raises(ops.BackendUnavailable, match=r"unknown backend 'cuda'.*torch"):
            ops.assign(torch.randn(3, 2), torch.randn(2, 2), 0.5)


@pytest.mark.parametrize("how", ["use_backend", "env"])
def test_forced_unavailable_backend_says_why(monkeypatch, how):
    missing = unavailable_on_cpu()
    if not missing:
        pytest.skip("every backend is usable on CPU in this run")
    name, reason = missing[0]
    x, c = torch.randn(4, 3), torch.randn(2, 3)
    if how == "env":
        monkeypatch.setenv("SEMCLUST_BACKEND", name)
        ctx = ops.use_backend(None)
    else:
        ctx = ops.use_backend(name)
    with ctx, pytest.raises(ops.BackendUnavailable) as e:
        ops.assign(x, c, 0.5)
    assert reason in str(e.value) and name in str(e.value)
    assert isinstance(e.value, RuntimeError)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if dispatch._load("triton") is not None:
        pytest.skip(f"triton backend not loadable here: {dispatch._load('triton')}")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = ops.available_backends("cpu")["triton"]
    assert reason is not None and "TRITON_INTERPRET" in reason
    with ops.use_backend("triton"), pytest.raises(ops.BackendUnavailable, match="TRITON_INTERPRET"):
        ops.assign(torch.randn(4, 3), torch.randn(2, 3), 0.5)


def test_default_on_cpu_is_a_cpu_backend():
    """Automatic choice on CPU never picks triton (its CPU mode is a debug interpreter)."""
    with ops.use_backend(None):
        for op in ("assign", "retrieve", "knn", "center_update", "balance"):
            assert active(op) in ("ext", "torch")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "SEMCLUST_BACKEND"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=120)


def test_import_without_triton():
    """`import semclust.ops` works when triton cannot be imported; triton then has a reason,
    forcing it raises that reason, and the ops run on torch."""
    code = """
        import sys
        sys.modules["triton"] = None  # `import triton` now raises ModuleNotFoundError
        import torch
        import semclust.ops as ops
        reason = ops.available_backends("cpu")["triton"]
        assert isinstance(reason, str) and reason, reason
        x, c = torch.randn(6, 4), torch.randn(3, 4)
        r = ops.assign(x, c, 0.5, return_probs=True)
        torch.testing.assert_close(r.probs, torch.softmax(x @ c.T / 0.5, 1))
        assert ops.knn(x, 2)[1].shape == (6, 2)
        with ops.use_backend("triton"):
            try:
                ops.assign(x, c, 0.5)
            except ops.BackendUnavailable as e:
                assert reason in str(e), (reason, str(e))
            else:
                raise AssertionError("forcing triton without triton must fail")
        print("REASON:", reason)
    """
    p = run_python(code, TRITON_INTERPRET="1")
    assert p.returncode == 0, p.stderr
    reason = p.stdout.split("REASON:", 1)[1].strip()
    if "not part of this build" not in reason:  # the kernels exist: the reason names triton
        assert "triton" in reason


def test_broken_backend_does_not_break_import(tmp_path):
    """An optional backend that raises on import is reported, not propagated."""
    code = """
        import importlib.abc, importlib.machinery, sys

        class Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, path=None, target=None):
                if name == "semclust.kernels":
                    return importlib.machinery.ModuleSpec(name, self)
            def create_module(self, spec):
                return None
            def exec_module(self, module):
                raise RuntimeError("kernel build exploded")

        sys.meta_path.insert(0, Broken())
        import torch
        import semclust.ops as ops
        reason = ops.available_backends("cpu")["triton"]
        assert "kernel build exploded" in reason and "RuntimeError" in reason, reason
        r = ops.assign(torch.randn(4, 3), torch.randn(2, 3), 0.5)
        assert r.labels.shape == (4,)
    """
    p = run_python(code, TRITON_INTERPRET="1")
    assert p.returncode == 0, p.stderr
