import os
import sys

import pytest
import torch

# The Triton interpreter must be chosen before triton is first imported; on a machine
# with a GPU the same tests run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# importlib import mode (pyproject) keeps same-named test files in tests/ops and
# tests/kernels apart without packages that shadow the real `kernels/` folder; the
# shared fixtures module is imported by name, so its folder goes on the path
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session", autouse=True)
def _noun_cache_outside_home(tmp_path_factory):
    """Noun embeddings are cached on disk: keep the tests' caches out of $HOME."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEMCLUST_CACHE", str(tmp_path_factory.mktemp("noun-cache")))
        yield


@pytest.fixture(scope="session")
def built_ext():
    """The C++ extension, built once per session. Where no compiler exists the ext tests
    are skipped with the build error; under CI a failed build fails them instead, so a
    broken extension can never pass as skipped."""
    from semclust import csrc as ext

    try:
        ext.build()
    except ext.ExtensionBuildError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the C++ extension cannot be built here: {e}")
    return ext
