"""Backend choice for the ops: torch (reference), triton (kernels/), ext (csrc/).

Default: the fastest backend that implements the op for the tensors' device. A forced
backend (`SEMCLUST_BACKEND` or `use_backend`) that cannot run raises `BackendUnavailable`
saying why; it never falls back silently.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from typing import Callable, Optional

import torch

BACKENDS = ("torch", "triton", "ext")
_IMPLS: dict[str, dict[str, Callable]] = {b: {} for b in BACKENDS}
_LOAD_ERRORS: dict[str, str] = {}
_LOADED: set[str] = set()
# per backend: (op, device) -> why it cannot run there, or None; set by the backend package
_DEVICE_REASONS: dict[str, Callable[[str, torch.device], Optional[str]]] = {}
_state = threading.local()

# where each optional backend registers its implementations when imported
_MODULES = {"triton": "semclust.kernels", "ext": "semclust.csrc"}


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run this op on these tensors; the message says why."""


def register(backend: str, op: str) -> Callable[[Callable], Callable]:
    """Decorator: `fn` is `backend`'s implementation of `op`."""

    def deco(fn: Callable) -> Callable:
        _IMPLS[backend][op] = fn
        return fn

    return deco


def mark_unavailable(backend: str, reason: Optional[str]) -> None:
    """Record why a loaded backend cannot run at all (e.g. "not built"), or clear it
    with None; `unavailable_reason` and `available_backends` report it."""
    if reason is None:
        _LOAD_ERRORS.pop(backend, None)
    else:
        _LOAD_ERRORS[backend] = reason


def set_device_reason(backend: str, fn: Callable[[str, torch.device], Optional[str]]) -> None:
    """Install `backend`'s check of whether it can run an op on a device: `fn(op, device)`
    returns the reason it cannot, or None."""
    _DEVICE_REASONS[backend] = fn


def _load(backend: str) -> Optional[str]:
    """Import an optional backend once; return the reason it is unusable, or None."""
    if backend == "torch" or backend in _LOADED:
        return _LOAD_ERRORS.get(backend)
    _LOADED.add(backend)
    try:
        importlib.import_module(_MODULES[backend])
    except ModuleNotFoundError as e:
        if e.name == _MODULES[backend]:
            _LOAD_ERRORS[backend] = f"the {backend} backend is not part of this build of semclust"
        else:
            _LOAD_ERRORS[backend] = f"the {backend} backend needs {e.name!r}, which cannot be imported ({e})"
    except Exception as e:  # a broken optional backend must not break `import semclust`
        _LOAD_ERRORS[backend] = f"the {backend} backend failed to load: {type(e).__name__}: {e}"
    return _LOAD_ERRORS.get(backend)


def _device_reason(backend: str, device: torch.device, op: Optional[str] = None) -> Optional[str]:
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"triton kernels run on CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 to interpret them on CPU"
    hook = _DEVICE_REASONS.get(backend)
    return hook(op, device) if hook is not None and op is not None else None


def unavailable_reason(backend: str, op: str, device: torch.device) -> Optional[str]:
    """Why `backend` cannot run `op` on `device` (loading it if needed), or None."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {BACKENDS}"
    reason = _load(backend)
    if reason:
        return reason
    if op not in _IMPLS[backend]:
        return f"the {backend} backend has no implementation of {op!r}"
    return _device_reason(backend, device, op)


def forced() -> Optional[str]:
    """The backend forced in this thread (`use_backend`) or by `SEMCLUST_BACKEND`, else None."""
    name = getattr(_state, "forced", None)
    if name is None:
        name = os.environ.get("SEMCLUST_BACKEND") or None
    return name


def resolve(op: str, device: torch.device) -> tuple[str, Callable]:
    """(backend name, implementation) for `op` on `device`: the forced backend, which
    must be able to run it, else the first usable one in order of preference."""
    name = forced()
    if name is not None:
        reason = unavailable_reason(name, op, device)
        if reason:
            raise BackendUnavailable(f"backend {name!r} was forced but cannot run {op}: {reason}")
        return name, _IMPLS[name][op]
    preference = ("triton", "ext", "torch") if device.type == "cuda" else ("ext", "torch")
    for b in preference:
        if unavailable_reason(b, op, device) is None:
            return b, _IMPLS[b][op]
    raise BackendUnavailable(f"no backend implements {op}")  # torch implements every op


def resolved_backends(device: str | torch.device = "cpu") -> dict[str, str]:
    """Map op -> the backend `resolve` picks for it on `device` now (the forced one, or
    the automatic choice): what a run will use, to log beside its timings (an extension
    not built for the current sources is skipped by the automatic choice). Never raises:
    an op the forced backend cannot run reads "<backend> (cannot run it)"."""
    dev = torch.device(device)
    out = {}
    for op in sorted(_IMPLS["torch"]):
        try:
            out[op] = resolve(op, dev)[0]
        except BackendUnavailable:  # a forced backend without the op: its callers decide (e.g. heads keep nn.BatchNorm1d)
            out[op] = f"{forced()} (cannot run it)"
    return out


def available_backends(device: str | torch.device = "cpu") -> dict[str, Optional[str]]:
    """Map backend name -> None when usable on `device`, else the reason it is not."""
    dev = torch.device(device)
    out = {}
    for b in BACKENDS:
        reason = _load(b) if b != "torch" else None
        out[b] = reason or _device_reason(b, dev)
    return out


def use_backend(name: Optional[str]):
    """Force a backend for the ops. Works as a call or a context manager.

    None removes this thread's override: `SEMCLUST_BACKEND` then applies if set,
    otherwise the automatic choice.

    >>> semclust.ops.use_backend("torch")          # from now on, in this thread
    >>> with semclust.ops.use_backend("triton"):   # only inside the block
    ...     ...
    """
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS} or None")
    # applying now makes the plain call form work; the context manager restores on exit
    prev = getattr(_state, "forced", None)
    _state.forced = name
    return _Restorer(prev)


class _Restorer(contextlib.AbstractContextManager):
    def __init__(self, prev: Optional[str]) -> None:
        self._prev = prev

    def __exit__(self, *exc: object) -> None:
        _state.forced = self._prev
