"""The `ext` backend of `semclust.ops`: C++ (OpenMP) and CUDA sources in this folder,
installed as `semclust.csrc`.

`library.py` builds, caches and loads the library (see its docstring for the build policy),
`ops.py` is each op's Python face (fake kernel, autograd Function, dispatcher entry).
Importing this package loads an already-built library and registers the ops; nothing is
compiled unless the ext backend is forced (`SEMCLUST_BACKEND=ext` /
`semclust.ops.use_backend("ext")`) or asked for (`semclust build-ext`, `build()`).
"""

from __future__ import annotations

import logging

import torch

from semclust.ops import dispatch

from . import ops
from .library import (REGISTERED_OPS, ExtensionBuildError, ExtensionNotBuilt, build, build_dir, build_name, cache_dir,
                    device_reason, info, is_built, library_path, load, not_built_message, source_dir)

__all__ = [
    "build", "load", "is_built", "info", "device_reason", "build_dir", "build_name", "cache_dir", "library_path",
    "source_dir", "REGISTERED_OPS", "ExtensionBuildError", "ExtensionNotBuilt",
]

log = logging.getLogger(__name__)


def _autoload() -> None:
    """Import-time policy: load what is built; build only for a forced ext backend."""
    forced = dispatch.forced() == "ext"
    if is_built("cpu") or forced:
        build(cuda=False) if forced else load("cpu")
        if torch.cuda.is_available() and torch.version.cuda is not None:
            if is_built("cuda"):
                load("cuda")
            elif forced:
                build(cuda=True)
    else:
        # import succeeds (so `semclust.csrc.build()` is reachable); the dispatcher reads
        # this note as the backend's "unavailable" reason and keeps the torch backend
        msg = not_built_message("cpu")
        dispatch.mark_unavailable("ext", msg)
        log.debug("semclust ext backend: %s", msg)


from . import library  # noqa: E402

library._on_load.append(ops.activate)
# fused_step runs only where the library for the tensors' device is loaded
dispatch.set_device_reason("ext", lambda op, device: device_reason(device) if op == "fused_step" else None)
_autoload()
