import os
import sys

import torch

# The Triton interpreter must be chosen before triton is first imported; on a machine
# with a GPU the same tests run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# importlib import mode (pyproject) keeps same-named test files in tests/ops and
# tests/kernels apart without packages that shadow the real `kernels/` folder; the
# shared fixtures module is imported by name, so its folder goes on the path
sys.path.insert(0, os.path.dirname(__file__))
