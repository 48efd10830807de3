"""Accuracy against TAC on every named scenario (`semclust.synthetic.SCENARIOS`), over seeds.

Per scenario and seed, all methods run on the same embeddings and nouns:
  image k-means              spherical k-means on the frozen image features
  TAC, training-free         TAC's counterparts (N/300 centres x 5 nouns, tau 0.005), k-means on [U || V]
  TAC heads                  TAC's counterparts and TAC's head training with its settings for K
                             (`Config.tac()`: the whole TAC recipe)
  stage 1                    semclust's default (pool counterparts, dynamic balance, text-space
                             centre target, image head)
  stage 2 (adapter)          self-enhancement of the default stage 1 on embeddings only
  ablations of stage 1       fixed balance (uniform prior), no centre target, mean of both heads,
                             TAC's counterparts with semclust's trainer (K <= --ablation-max-k)

    python -m semclust.bench.method [--scenarios gap,longtail10] [--seeds 3] [--json out.json]

Not a timed test: prints mean +- std of ACC/NMI/ARI and seconds per method and scenario.
Stage 1's seconds are the heads' training alone (counterparts and kNN are shared phases).
The same scenarios with K unknown (`n_clusters="auto"`: true K, estimate, ACC at each) are
`semclust.bench.k` (`semclust bench k`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from semclust import SemanticClusterer, ops
from semclust.config import Config, Stage1Config
from semclust.method import counterparts, stage1, tac
from semclust.metrics import evaluate
from semclust.synthetic import SCENARIOS, make_scenario

ABLATIONS: dict[str, Callable[[Stage1Config], Stage1Config]] = {
    "stage 1, fixed balance": lambda c: replace(c, balance="fixed"),
    "stage 1, no centre target": lambda c: replace(c, center_target=False),
    "stage 1, mean of both heads": lambda c: replace(c, predict_with="both"),
}


def _views(u: torch.Tensor, nouns: torch.Tensor, k: int, cfg: Config, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(v, image kNN, text kNN) as a fit with `cfg` builds them."""
    space = counterparts.select_nouns(u, nouns, k, cfg.semantic, seed=seed, chunks=cfg.chunks)
    v = counterparts.text_counterparts(u, space.bank(nouns), cfg.counterparts, cfg.chunks)
    m = min(cfg.neighbours.k, u.shape[0] - 1)
    return v, ops.knn(u, m)[1], ops.knn(v, m)[1]


def run_scenario(name: str, seed: int, stage2_epochs: int, ablation_max_k: int) -> dict[str, dict]:
    data = make_scenario(name, seed)
    y, k = data.labels, data.spec.k
    u = F.normalize(data.embeddings.float(), dim=1)
    nouns = data.noun_embeddings.float()
    out: dict[str, dict] = {}

    def add(method: str, pred: np.ndarray, seconds: float) -> None:
        out[method] = {**evaluate(y, np.asarray(pred)), "seconds": seconds}

    t = time.perf_counter()
    add("image k-means", ops.kmeans(u, k, restarts=3, seed=seed).labels.numpy(), time.perf_counter() - t)

    tac_cfg = Config.tac()
    t = time.perf_counter()
    v_t, ni_t, nt_t = _views(u, nouns, k, tac_cfg, seed)
    views_s = time.perf_counter() - t
    t = time.perf_counter()
    add("TAC, training-free", tac.tac_training_free(u, v_t, k, seed=seed), views_s + time.perf_counter() - t)
    t = time.perf_counter()
    r = stage1.train_stage1(u, v_t, k, ni_t, nt_t, tac_cfg.stage1, seed=seed, progress=False)
    add("TAC heads", r.labels.numpy(), time.perf_counter() - t)

    cfg = Config()
    cfg.stage2.epochs = stage2_epochs
    t = time.perf_counter()
    m = SemanticClusterer(k, clip=None, config=cfg, stage=2, seed=seed, device="cpu", progress=False)
    m.fit(data.embeddings, nouns=data.noun_embeddings)
    add("stage 1", m.stage1_labels_, m.history_["seconds"]["stage1"])
    add("stage 2 (adapter)", m.labels_, m.history_["seconds"]["stage2"])

    if k <= ablation_max_k:
        v, ni, nt = _views(u, nouns, k, cfg, seed)
        for label, change in ABLATIONS.items():
            t = time.perf_counter()
            r = stage1.train_stage1(u, v, k, ni, nt, change(cfg.stage1), seed=seed, progress=False)
            add(label, r.labels.numpy(), time.perf_counter() - t)
        t = time.perf_counter()
        r = stage1.train_stage1(u, v_t, k, ni_t, nt_t, cfg.stage1, seed=seed, progress=False)
        add("stage 1 on TAC's counterparts", r.labels.numpy(), time.perf_counter() - t)
    return out


def _fmt(vals: list[float]) -> str:
    return f"{statistics.mean(vals):.3f} ± {statistics.pstdev(vals):.3f}"


def table(results: dict[str, list[dict[str, dict]]]) -> str:
    lines = []
    for name, runs in results.items():
        lines.append(f"\n{name} ({len(runs)} seeds)")
        lines.append(f"{'method':32s} {'ACC':>14s} {'NMI':>14s} {'ARI':>14s} {'seconds':>8s}")
        for method in runs[0]:
            rows = [r[method] for r in runs if method in r]
            lines.append(f"{method:32s} {_fmt([r['acc'] for r in rows]):>14s} {_fmt([r['nmi'] for r in rows]):>14s} "
                         f"{_fmt([r['ari'] for r in rows]):>14s} {statistics.mean(r['seconds'] for r in rows):8.1f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--stage2-epochs", type=int, default=10)
    p.add_argument("--ablation-max-k", type=int, default=50, help="run the ablations only where K is at most this")
    p.add_argument("--quick", action="store_true", help="the gap scenario, one seed, 3 stage-2 epochs (a smoke run)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    if a.quick:
        a.scenarios, a.seeds, a.stage2_epochs = "gap", 1, 3
    names = a.scenarios.split(",")
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenarios {unknown}; choose from {sorted(SCENARIOS)}")
    print(f"bench_method: torch {torch.__version__}, {torch.get_num_threads()} threads, backend of the fused step: "
          f"{'ext' if stage1.fused_step_active(torch.device('cpu')) else 'torch'}")
    results: dict[str, list[dict[str, dict]]] = {}
    for name in names:
        for seed in range(a.seeds):
            results.setdefault(name, []).append(run_scenario(name, seed, a.stage2_epochs, a.ablation_max_k))
            print(f"{name} seed {seed}: " + ", ".join(f"{m} {r['acc']:.3f}" for m, r in results[name][-1].items()),
                  flush=True)
            if a.json:  # after every run: a long benchmark cut short keeps what it measured
                with open(a.json, "w") as f:
                    json.dump(results, f, indent=2)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
