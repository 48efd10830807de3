"""Building and loading the `ext` backend's library: the sources in this folder, JIT-built
with `torch.utils.cpp_extension` + ninja, cached, loaded with `torch.ops.load_library`.

What it provides:
  * `fused_step` (CPU and CUDA): the stage-1 loss and its logit gradients in one call
    (see `semclust.ops.fused_step`).
  * CPU fast paths (`assign.cpp`, `knn.cpp`, `center_update.cpp`, sharing `cpu_common.h`:
    a GEMM tile per thread with the op's epilogue fused onto it). Registered with the
    dispatcher because they beat the torch backend
    (semclust/bench/step.py, 2-core AVX-512 CPU, 1 and 2 threads):
      assign         1.2-1.5x faster; within 1.05-1.2x of a bare GEMM of the same shape
      knn            6-30x faster (no sort of the [chunk, N] scores); on a par with
                     faiss-cpu IndexFlatIP at D=512 (0.94-1.03x), 1.15-1.8x faster at
                     D=64; within 1.1x of a bare GEMM at D=512 (1.3-1.5x at D=64, where
                     the running top-k's insertions rival the small GEMM)
      center_update  hard labels 1.7-3.5x; soft at stage-1 sizes ~1.8x (large N: the
                     same GEMM as torch, 1.0x)
      batchnorm_relu the heads' BN + ReLU in training, forward and backward fused, each
                     thread streaming the rows through its own column range: a stage-1
                     step 6-8% faster at K = 10
    Not implemented: `retrieve` (an ext version measured 0.8-1.16x torch: two GEMMs
    either way, so no reliable gain; it was removed) and `balance` (only the Python loss
    graph uses it, and `fused_step` replaces that graph).
    Forcing `ext` therefore covers stage 1 (knn, fused_step, center_update, batchnorm_relu) and k-means
    (assign, center_update); a forced `ext` stops at `retrieve` / `balance` with
    BackendUnavailable, as for any backend lacking an op.
  Each is a `torch.ops.semclust_ext.*` operator (TORCH_LIBRARY schemas in
  `bindings.cpp`, the C++ counterpart of `torch.library.custom_op`) with a fake
  (meta) kernel beside its Python face in `csrc/ops.py`, so they trace under torch.compile. Gradients w.r.t.
  assign / knn / center_update inputs are computed on the backward pass by recomputing
  the reference, so the ops stay differentiable as the reference is; batchnorm_relu has a
  backward kernel. On non-CPU tensors these four run the reference when ext was chosen
  automatically and raise BackendUnavailable when ext was forced.

Build policy (no import ever compiles unless you ask for the ext backend):
  * Importing `semclust.csrc` loads an already-built library from the cache (a dlopen) and
    registers the ops; the automatic backend choice then prefers `ext`.
  * When nothing is built, importing registers nothing: the backend reports "not built"
    and the automatic choice stays on `torch`. Build once with `semclust build-ext`
    (`--cuda` adds the CUDA part), or call `semclust.csrc.build()`.
  * Forcing the backend (`SEMCLUST_BACKEND=ext` or `semclust.ops.use_backend("ext")`)
    before its first use builds on that first use (a few minutes, once). Forcing it
    after the process has already found it unbuilt raises with that explanation.
  * A missing compiler or ninja, a failing build, or a CPU-only torch for the CUDA part
    raise `ExtensionBuildError` naming the cause and the fix; the torch backend keeps
    working.

Cache: `$SEMCLUST_EXT_DIR`, else `$XDG_CACHE_HOME/semclust/ext` (`~/.cache/semclust/ext`).
Each build lives in `<cache>/semclust_ext_{cpu,cuda}_<hash>`, the hash covering the
sources, the flags, the torch / CUDA versions and the host CPU (the CPU part is built
with -march=native), so any change to them builds afresh and stale builds are never
loaded. `TORCH_CUDA_ARCH_LIST` picks the CUDA architectures (default "8.0;9.0").
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch



log = logging.getLogger(__name__)

NAMESPACE = "semclust_ext"
# the build hash covers every file compiled (SOURCES) or included (HEADERS) by a part
CPU_SOURCES = ("bindings.cpp", "fused_step.cpp", "assign.cpp", "knn.cpp", "center_update.cpp", "batchnorm_relu.cpp")
CPU_HEADERS = ("cpu_math.h", "cpu_common.h", "check_inputs.h")
CUDA_SOURCES = ("fused_step.cu",)
CUDA_HEADERS = ("check_inputs.h",)
# -fno-trapping-math (torch builds with it too) lets GCC if-convert the clamps of exp_ and
# vectorise the softmax loops: without it they ran scalar, 2.5x slower. It changes no
# result (no -ffast-math: inf / nan semantics and the order of sums are kept).
CPU_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-fno-math-errno")
CPU_LDFLAGS = ("-fopenmp",)
CUDA_CFLAGS = ("-O3",)
CUDA_NVCC_FLAGS = ("-O3",)  # no --use_fast_math: the kernels must match the CPU path and the reference
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"
# ops registered with the dispatcher as `ext` implementations (measured faster; see above)
REGISTERED_OPS = ("fused_step", "assign", "knn", "center_update", "batchnorm_relu")
_STAMP = "BUILT"


class ExtensionBuildError(RuntimeError):
    """The extension could not be built or loaded; the message says why and how to fix it."""


class ExtensionNotBuilt(ExtensionBuildError):
    """The extension is not built yet (and nothing asked to build it)."""


# ---- where things are ------------------------------------------------------------------

def source_dir() -> Path:
    """The installed `csrc/` folder (package `semclust.csrc`): this file's folder."""
    return Path(__file__).resolve().parent


def cache_dir() -> Path:
    """Root of the build cache: $SEMCLUST_EXT_DIR, else $XDG_CACHE_HOME/semclust/ext."""
    env = os.environ.get("SEMCLUST_EXT_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "semclust" / "ext"


def _cpu_fingerprint() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))][:2]
        return "\n".join(keep)
    except OSError:
        return platform.processor() or platform.machine()


def _cuda_arch_list() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH_LIST


def _cuda_arch_flags() -> list[str]:
    """-gencode flags for TORCH_CUDA_ARCH_LIST ("8.0;9.0", "8.6+PTX", ...)."""
    flags = []
    for item in _cuda_arch_list().replace(",", ";").replace(" ", ";").split(";"):
        if not item:
            continue
        arch = item.replace("+PTX", "")
        num = arch.replace(".", "")
        if not num.isdigit() and not (num[:-1].isdigit() and num[-1] in "af"):
            raise ExtensionBuildError(f"TORCH_CUDA_ARCH_LIST has {item!r}; use entries like 8.0, 9.0 or 9.0+PTX")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if item.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _part_sources(part: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(compiled sources, other files the build depends on). The CUDA library adds kernels
    to the operators bindings.cpp defines, so their schemas are part of its identity."""
    return (CPU_SOURCES, CPU_HEADERS) if part == "cpu" else (CUDA_SOURCES, CUDA_HEADERS + ("bindings.cpp",))


def build_name(part: str = "cpu") -> str:
    """`semclust_ext_<part>_<hash>`: the hash covers sources, flags and toolchain."""
    sources, headers = _part_sources(part)
    h = hashlib.sha256()
    src = source_dir()
    for name in sources + headers:
        h.update(name.encode())
        h.update((src / name).read_bytes())
    h.update(repr((torch.__version__, sys.version_info[:2], platform.machine())).encode())
    if part == "cpu":
        h.update(repr((CPU_CFLAGS, CPU_LDFLAGS)).encode())
        h.update(_cpu_fingerprint().encode())
    else:
        h.update(repr((CUDA_CFLAGS, CUDA_NVCC_FLAGS, torch.version.cuda, _cuda_arch_list())).encode())
    return f"{NAMESPACE}_{part}_{h.hexdigest()[:12]}"


def build_dir(part: str = "cpu") -> Path:
    return cache_dir() / build_name(part)


def library_path(part: str = "cpu", directory: Optional[Path] = None) -> Path:
    directory = directory or build_dir(part)
    return directory / f"{directory.name}.so"


def is_built(part: str = "cpu") -> bool:
    """A finished build for the current sources exists in the cache."""
    d = build_dir(part)
    return (d / _STAMP).exists() and library_path(part, d).exists()


# ---- toolchain checks ------------------------------------------------------------------

def _check_cxx() -> None:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise ExtensionBuildError(
            f"no C++ compiler: CXX={cxx!r} was not found. Install one (e.g. `apt-get install g++` or "
            "`conda install gxx`) or set CXX to its path, then run `semclust build-ext`. "
            "Until then the torch backend keeps working."
        )
    if not cpp_extension.is_ninja_available():
        raise ExtensionBuildError(
            "ninja is not available: `pip install ninja` (the extension is built with it), then run `semclust build-ext`."
        )


def _find_cuda_home() -> Optional[str]:
    from torch.utils import cpp_extension

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
                  "/usr/local/cuda", "/opt/cuda"]
    for c in candidates:
        if not c:
            continue
        home = Path(c)
        has_rt = any((home / lib / "libcudart.so").exists() for lib in ("lib64", "lib", "targets/x86_64-linux/lib"))
        if (home / "bin" / "nvcc").exists() and has_rt:
            return str(home)
    return None


def _check_cuda() -> None:
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        raise ExtensionBuildError(
            f"the CUDA part needs a CUDA build of torch, but this torch ({torch.__version__}) is CPU-only. "
            "Install a CUDA wheel (https://pytorch.org/get-started/locally/) or build the CPU part alone "
            "(`semclust build-ext` without --cuda)."
        )
    home = _find_cuda_home()
    if home is None:
        raise ExtensionBuildError(
            "no CUDA toolkit found for the CUDA part: set CUDA_HOME to the folder holding bin/nvcc and "
            "lib64/libcudart.so (e.g. CUDA_HOME=/usr/local/cuda), or install the toolkit matching "
            f"torch's CUDA {torch.version.cuda}."
        )
    if cpp_extension.CUDA_HOME != home:
        # torch guesses CUDA_HOME once at import (from `which nvcc`, which may be a wrapper
        # script outside the toolkit) and would link against a missing -lcudart
        log.info("using CUDA_HOME=%s (torch guessed %s)", home, cpp_extension.CUDA_HOME)
        cpp_extension.CUDA_HOME = home
        os.environ["CUDA_HOME"] = home


# ---- build and load --------------------------------------------------------------------

_loaded: dict[str, Path] = {}
# called after the CPU library is loaded: registering the fakes and the dispatcher
# implementations (`csrc/__init__.py` installs it; this module imports no op code)
_on_load: list[Callable[[], None]] = []


def _compile(part: str, directory: Path, verbose: bool) -> Path:
    """Compile and load `part` into this process with cpp_extension.load (ninja)."""
    from torch.utils import cpp_extension

    sources, _ = _part_sources(part)
    src = source_dir()
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = dict(
        name=directory.name,
        sources=[str(src / s) for s in sources],
        extra_include_paths=[str(src)],
        build_directory=str(directory),
        verbose=verbose,
        is_python_module=False,
    )
    if part == "cpu":
        kwargs.update(extra_cflags=list(CPU_CFLAGS), extra_ldflags=list(CPU_LDFLAGS), with_cuda=False)
    else:
        kwargs.update(extra_cflags=list(CUDA_CFLAGS), extra_cuda_cflags=list(CUDA_NVCC_FLAGS) + _cuda_arch_flags(),
                      with_cuda=True)
    t0 = time.perf_counter()
    try:
        cpp_extension.load(**kwargs)
    except Exception as e:
        out = str(e).strip().splitlines()
        # the compiler's own error lines (ninja -v also echoes every command line, which
        # would bury them) and the targets that failed
        errors = [ln for ln in out if re.search(r"\berror\b", ln, re.I) and not re.search(r"\s-c\s", ln)]
        failed = [ln for ln in out if ln.startswith("FAILED:")]
        tail = "\n".join(dict.fromkeys(errors[:20] + failed[:5])) or "\n".join(out[-15:])
        raise ExtensionBuildError(
            f"building the semclust {part.upper()} extension failed in {directory} "
            f"({type(e).__name__}). The compiler said:\n{tail}\n"
            "Check the compiler (CXX) and, for the CUDA part, CUDA_HOME / nvcc; rerun with "
            "`semclust -v build-ext` for the full log. The torch backend keeps working meanwhile."
        ) from e
    (directory / _STAMP).write_text(f"{directory.name}\nbuilt in {time.perf_counter() - t0:.1f}s\n")
    return library_path(part, directory)


_CHILD_ERROR = "semclust-ext-build-error:"


def _build_in_subprocess(part: str, directory: Path, verbose: bool) -> Path:
    """Compile in a child process: nothing is loaded here (used for builds into another
    directory, e.g. the compile check of the CUDA part on a machine without a GPU)."""
    code = (
        "import sys, pathlib\n"
        "from semclust.csrc import library\n"
        "try:\n"
        "    print(library._compile(sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3] == '1'))\n"
        "except library.ExtensionBuildError as e:\n"
        f"    print({_CHILD_ERROR!r}, e, file=sys.stderr); sys.exit(3)\n"
    )
    env = dict(os.environ)
    env.pop("SEMCLUST_BACKEND", None)  # the child must not build the cached library on import
    r = subprocess.run([sys.executable, "-c", code, part, str(directory), "1" if verbose else "0"],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        msg = r.stderr.strip()
        if _CHILD_ERROR in msg:
            msg = msg.split(_CHILD_ERROR, 1)[1].strip()
        else:
            msg = f"the build process failed (exit {r.returncode}):\n" + "\n".join(msg.splitlines()[-40:])
        raise ExtensionBuildError(msg)
    return Path(r.stdout.strip().splitlines()[-1])


def load(part: str = "cpu") -> Path:
    """Load an already-built library from the cache (no compiling)."""
    if part in _loaded:
        return _loaded[part]
    if not is_built(part):
        raise ExtensionNotBuilt(not_built_message(part))
    if part == "cuda" and "cpu" not in _loaded:
        load("cpu")  # the CUDA library adds kernels to the operators the CPU one defines
    path = library_path(part)
    torch.ops.load_library(str(path))
    _loaded[part] = path
    log.info("loaded the semclust %s extension from %s", part.upper(), path)
    if part == "cpu":
        for fn in _on_load:
            fn()
    return path


def build(cuda: bool = False, *, verbose: bool = False, directory: Optional[Path | str] = None, load_it: bool = True) -> Path:
    """Build (if needed) and load the extension; returns the library path.

    Args:
        cuda: build the CUDA part (and the CPU part it extends) instead of the CPU part only.
        verbose: show the compiler commands.
        directory: build into this folder instead of the cache (implies ``load_it=False``:
            the operators can be registered only once per process).
        load_it: load the library into this process (otherwise it is compiled in a child
            process; used for compile checks).
    Raises:
        ExtensionBuildError: missing compiler / ninja / CUDA toolkit, CPU-only torch for
            ``cuda=True``, or a failing build; the message says which and how to fix it.
    """
    part = "cuda" if cuda else "cpu"
    if directory is None and load_it:
        if cuda:
            build(cuda=False, verbose=verbose)
        if part in _loaded:
            return _loaded[part]
        if is_built(part):
            return load(part)
    _check_cxx()
    if cuda:
        _check_cuda()
    if directory is not None or not load_it:
        target = Path(directory) if directory is not None else build_dir(part)
        log.info("compiling the semclust %s extension in %s", part.upper(), target)
        return _build_in_subprocess(part, target, verbose)
    log.warning("building the semclust %s extension in %s (once; a few minutes)", part.upper(), build_dir(part))
    _compile(part, build_dir(part), verbose)
    return load(part)


def not_built_message(part: str = "cpu") -> str:
    flag = " --cuda" if part == "cuda" else ""
    return (
        f"the C++ extension is not built yet (looked for {build_dir(part)}); build it once with "
        f"`semclust build-ext{flag}` or `semclust.csrc.build({'cuda=True' if part == 'cuda' else ''})`, or force the ext "
        "backend (SEMCLUST_BACKEND=ext) before its first use to build it then"
    )


def device_reason(device: torch.device) -> Optional[str]:
    """Why the extension cannot run fused_step on `device` (None when it can)."""
    if device.type == "cpu":
        return None if "cpu" in _loaded else not_built_message("cpu")
    if device.type == "cuda":
        if "cuda" in _loaded:
            return None
        if torch.version.cuda is None:
            return "torch is a CPU-only build; the extension's CUDA part needs a CUDA build of torch"
        return not_built_message("cuda")
    return f"the extension has no kernels for {device.type} tensors"


def info() -> dict:
    """Build/cache state, for logs and `semclust build-ext`."""
    return {
        "cache_dir": str(cache_dir()),
        "cpu": {"name": build_name("cpu"), "built": is_built("cpu"), "loaded": "cpu" in _loaded},
        "cuda": {"name": build_name("cuda"), "built": is_built("cuda"), "loaded": "cuda" in _loaded},
        "registered_ops": list(REGISTERED_OPS) if "cpu" in _loaded else [],
    }
