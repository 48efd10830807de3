"""Building the extension: the CUDA compile check, the cache naming, the import policy
and the error messages when a build cannot happen (the torch backend must keep working).

`test_compile_check_cuda_source_with_nvcc` is the compile check of csrc/fused_step.cu: it
runs nvcc through the same build path as `semclust build-ext --cuda`, into a temporary
folder, in a child process (nothing is loaded; no GPU is needed). It takes 1-2 minutes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from semclust import csrc as ext
from semclust import ops
from semclust.csrc import library
from semclust.ops import dispatch


def _torch_backend_still_works():
    from semclust.ops import fused_step

    x, c = torch.nn.functional.normalize(torch.randn(20, 8), dim=1), torch.randn(3, 8)
    with ops.use_backend("torch"):
        r = ops.assign(x, c, 0.5, return_probs=True)
        torch.testing.assert_close(r.probs, torch.softmax(x @ c.T / 0.5, 1))
        for prior in (None, torch.tensor([0.5, 0.3, 0.2])):
            li = torch.randn(8, 3, requires_grad=True)
            out = fused_step(li, torch.randn(8, 3), x[:4], x[4:8], centers=None, prior=prior, cluster_tau=0.5,
                             center_tau=0.1, w_instance=0.5, w_assignment=1.0, w_center=1.0, w_balance=2.0)
            out.loss.backward()
            assert li.grad is not None and bool(torch.isfinite(li.grad).all())
            assert float(out.balance) >= 0.0  # KL(p_bar || prior) + KL(q_bar || prior)


# ---- the CUDA compile check ------------------------------------------------------------------


@pytest.mark.slow
def test_compile_check_cuda_source_with_nvcc(tmp_path):
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU-only build: the CUDA part cannot be compiled against it")
    if library._find_cuda_home() is None:
        pytest.skip("no CUDA toolkit (nvcc + libcudart) found; set CUDA_HOME to run the compile check")
    lib = ext.build(cuda=True, directory=tmp_path / "cuda", load_it=False)
    assert lib.exists() and lib.stat().st_size > 0
    assert (tmp_path / "cuda" / "BUILT").exists()
    built = {p.name for p in (tmp_path / "cuda").iterdir()}
    assert "fused_step.cuda.o" in built, built


def test_cuda_arch_list_default_and_override(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    flags = library._cuda_arch_flags()
    assert flags == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    name = ext.build_name("cuda")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6+PTX")
    assert library._cuda_arch_flags() == ["-gencode=arch=compute_86,code=sm_86", "-gencode=arch=compute_86,code=compute_86"]
    assert ext.build_name("cuda") != name  # another architecture is another build
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "sm_eighty")
    with pytest.raises(ext.ExtensionBuildError, match="TORCH_CUDA_ARCH_LIST"):
        library._cuda_arch_flags()


# ---- build errors -------------------------------------------------------------------------


def test_missing_compiler_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(ext.ExtensionBuildError) as e:
        ext.build(directory=tmp_path / "b")
    msg = str(e.value)
    assert "no C++ compiler" in msg and "CXX" in msg and "apt-get install g++" in msg
    assert "torch backend keeps working" in msg
    # the command line (a fresh process: this one has the library loaded) prints the
    # whole message and fails with 2
    p = subprocess.run([sys.executable, "-m", "semclust", "build-ext"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "SEMCLUST_EXT_DIR": str(tmp_path / "empty-cache")})
    assert p.returncode == 2, p.stderr
    assert "no C++ compiler" in p.stderr and "apt-get install g++" in p.stderr
    _torch_backend_still_works()


def test_failing_build_shows_the_compiler_error(monkeypatch, tmp_path):
    fake = tmp_path / "fake-c++"
    # answers version queries like the real compiler, fails every compilation
    fake.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do [ "$a" = "-c" ] && { echo "fused_step.cpp:1:1: error: simulated compiler failure" >&2; exit 1; }; done\n'
        f'exec {shutil.which("c++") or "c++"} "$@"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    with pytest.raises(ext.ExtensionBuildError) as e:
        ext.build(directory=tmp_path / "b")
    msg = str(e.value)
    assert "failed" in msg and "simulated compiler failure" in msg, msg
    assert "torch backend keeps working" in msg
    _torch_backend_still_works()


def test_cuda_part_on_cpu_only_torch(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ext.ExtensionBuildError, match="CPU-only.*without --cuda"):
        ext.build(cuda=True, directory=tmp_path / "b")
    assert "CPU-only" in ext.device_reason(torch.device("cuda"))
    _torch_backend_still_works()


def test_cuda_part_without_toolkit(monkeypatch, tmp_path):
    if torch.version.cuda is None:
        pytest.skip("CPU-only torch: covered by test_cuda_part_on_cpu_only_torch")
    monkeypatch.setattr(library, "_find_cuda_home", lambda: None)
    with pytest.raises(ext.ExtensionBuildError, match="CUDA_HOME"):
        ext.build(cuda=True, directory=tmp_path / "b")


# ---- cache naming -------------------------------------------------------------------------


def test_build_name_follows_the_sources(monkeypatch, tmp_path):
    src = tmp_path / "csrc"
    shutil.copytree(ext.source_dir(), src)
    monkeypatch.setattr(library, "source_dir", lambda: src)
    cpu, cuda = ext.build_name("cpu"), ext.build_name("cuda")
    assert cpu.startswith("semclust_ext_cpu_") and cuda.startswith("semclust_ext_cuda_")
    (src / "fused_step.cpp").write_text((src / "fused_step.cpp").read_text() + "\n// edited\n")
    cpu2 = ext.build_name("cpu")
    assert cpu2 != cpu and ext.build_name("cuda") == cuda  # the CPU kernels are not part of the CUDA library
    (src / "cpu_math.h").write_text((src / "cpu_math.h").read_text() + "\n// edited\n")
    assert ext.build_name("cpu") not in (cpu, cpu2)
    (src / "fused_step.cu").write_text((src / "fused_step.cu").read_text() + "\n// edited\n")
    cuda2 = ext.build_name("cuda")
    assert cuda2 != cuda
    cpu3 = ext.build_name("cpu")
    (src / "cpu_common.h").write_text((src / "cpu_common.h").read_text() + "\n// edited\n")
    cpu4 = ext.build_name("cpu")
    assert cpu4 != cpu3 and ext.build_name("cuda") == cuda2
    (src / "check_inputs.h").write_text((src / "check_inputs.h").read_text() + "\n// edited\n")
    assert ext.build_name("cpu") != cpu4 and ext.build_name("cuda") != cuda2  # included by both parts
    monkeypatch.setenv("SEMCLUST_EXT_DIR", str(tmp_path / "cache"))
    assert ext.build_dir("cpu") == tmp_path / "cache" / ext.build_name("cpu")
    assert not ext.is_built("cpu")  # edited sources are never served from an older build


def test_build_hash_covers_every_compiled_or_included_file():
    """Each part's hash lists every local file its sources compile or #include "...", and
    the folder holds no C++ / CUDA file that no part builds."""
    src = ext.source_dir()
    for part in ("cpu", "cuda"):
        sources, deps = library._part_sources(part)
        todo, seen = list(sources), set()
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            todo += re.findall(r'^\s*#\s*include\s+"([^"]+)"', (src / name).read_text(), re.M)
        assert seen <= set(sources) | set(deps), (part, seen - set(sources) - set(deps))
    on_disk = {p.name for p in src.iterdir() if p.suffix in (".cpp", ".cu", ".h")}
    assert on_disk == set(library.CPU_SOURCES + library.CPU_HEADERS + library.CUDA_SOURCES + library.CUDA_HEADERS)


# ---- import / force policy ------------------------------------------------------------------


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "SEMCLUST_BACKEND"}
    full.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full,
                          timeout=300)


def test_import_never_compiles_and_unbuilt_means_torch(tmp_path):
    code = """
        import time
        t0 = time.perf_counter()
        import torch
        import semclust.ops as ops
        from semclust import csrc as ext
        from semclust.ops.fused_step import active
        reason = ops.available_backends("cpu")["ext"]
        assert not ext.is_built("cpu") and reason and "not built" in reason and "semclust build-ext" in reason, reason
        x, c = torch.randn(6, 4), torch.randn(3, 4)
        with ops.use_backend(None):
            assert ops.assign(x, c, 0.5).labels.shape == (6,)  # on torch
            assert not active("cpu")
        with ops.use_backend("ext"):
            try:
                ops.assign(x, c, 0.5)
            except ops.BackendUnavailable as e:
                assert "not built" in str(e), str(e)
            else:
                raise AssertionError("a forced, unbuilt ext backend must say why")
        assert not any(ext.cache_dir().iterdir()) if ext.cache_dir().exists() else True
        print("SECONDS", time.perf_counter() - t0)
    """
    p = _python(code, SEMCLUST_EXT_DIR=str(tmp_path / "cache"))
    assert p.returncode == 0, p.stderr
    assert float(p.stdout.split("SECONDS")[1]) < 60  # an import and two tiny ops, no compile


def test_forcing_ext_builds_on_first_use(monkeypatch):
    """The import-time policy without compiling: forced -> build(); unforced -> a note."""
    calls = []
    monkeypatch.setattr(ext, "is_built", lambda part="cpu": False)
    monkeypatch.setattr(ext, "build", lambda cuda=False, **kw: calls.append(cuda))
    monkeypatch.setattr(dispatch, "_LOAD_ERRORS", {})
    with ops.use_backend("ext"):
        ext._autoload()
    assert calls and calls[0] is False
    assert "ext" not in dispatch._LOAD_ERRORS
    calls.clear()
    with ops.use_backend(None):
        ext._autoload()
    assert calls == [] and "not built" in dispatch._LOAD_ERRORS["ext"]


def test_cli_build_ext_reports_the_cache(capsys):
    from semclust.cli import main

    try:
        rc = main(["build-ext"])
    except ext.ExtensionBuildError as e:  # pragma: no cover - no compiler on this machine
        pytest.skip(str(e))
    out = capsys.readouterr().out
    if rc != 0:
        pytest.skip("the extension cannot be built here")
    assert f"cache: {ext.cache_dir()}" in out and ext.build_name("cpu") in out
    assert str(ext.library_path("cpu")) in out
    assert ext.info()["cpu"]["loaded"] and ops.available_backends("cpu")["ext"] is None
