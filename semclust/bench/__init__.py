"""Benchmarks against peers, shipped with the package so `semclust bench WHAT` runs from
an installed copy: `ops` (each op vs torch eager / faiss / scikit-learn), `step` (the
fused stage-1 step vs eager, and its roofline), `scale` (a streamed fit, 100k-1M rows),
`method` (accuracy of each variant beside TAC), `k` (the estimate of n_clusters="auto").

Each module is also `python -m semclust.bench.<what> --help`. Peers that are not
installed (faiss-cpu, scikit-learn) are skipped and said so in the output.
"""

NAMES: tuple[str, ...] = ("ops", "step", "scale", "method", "k")
