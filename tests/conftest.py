import os

import torch

# The Triton interpreter must be chosen before triton is first imported; on a machine
# with a GPU the same tests run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
