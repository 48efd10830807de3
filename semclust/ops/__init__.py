"""The fused-op API: one function per hot path, dispatched to a backend.

Backends: ``torch`` (the reference, any device), ``triton`` (CUDA tensors; CPU only
under ``TRITON_INTERPRET=1``), ``ext`` (the C++/CUDA extension). The default is the
fastest backend implementing the op for the tensors' device; force one with
``SEMCLUST_BACKEND=torch|triton|ext`` or :func:`use_backend`. A forced backend that
cannot run raises :class:`BackendUnavailable` with the reason.
"""

from .assign import assign
from .batchnorm_relu import batchnorm_relu
from .balance import balance
from .center_update import center_update
from .dispatch import BackendUnavailable, available_backends, resolved_backends, use_backend
from .fused_step import fused_step
from .kmeans import kmeans
from .knn import knn
from .normalize import normalize_rows
from .reference import AssignResult, BalanceResult, KMeansResult, StepResult
from .retrieve import retrieve

__all__ = [
    "assign", "retrieve", "knn", "center_update", "balance", "kmeans", "fused_step", "batchnorm_relu", "normalize_rows",
    "use_backend", "available_backends", "resolved_backends", "BackendUnavailable",
    "AssignResult", "BalanceResult", "KMeansResult", "StepResult",
]
