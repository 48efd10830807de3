import os
import sys

# the shared helpers of the kernel tests are imported by name (importlib import mode)
sys.path.insert(0, os.path.dirname(__file__))
