"""Method ablations on the synthetic set: what each choice buys, over several seeds.

Variants (all on the same data per seed):
  k-means                      spherical k-means on the frozen features
  stage 1                      the default (dynamic balancing, centre alignment)
  stage 1, fixed balance       TAC's fixed entropy weight instead of the dynamic one
  stage 1, no centre target    without the "better centre generation" prototype target
  stage 1, mean of both heads  predicting with the mean of f_I and f_T instead of f_I alone
  stage 2 (encoder)            fine-tuning the synthetic encoder's last layer
  stage 2 (adapter)            embeddings only: a residual adapter on frozen features

    python -m benchmarks.bench_method [--seeds 3] [--n 5000] [--json out.json]

Not a timed test: prints mean +- std of ACC/NMI/ARI per variant.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from semclust import SemanticClusterer, ops
from semclust.config import Config
from semclust.inputs.sources import TensorSource
from semclust.metrics import evaluate
from semclust.synthetic import SyntheticSpec, make_synthetic


def _variants() -> dict[str, Callable[[Config], None]]:
    def fixed(c: Config) -> None:
        c.stage1.balance = "fixed"

    def no_center(c: Config) -> None:
        c.stage1.center_target = False

    def both_heads(c: Config) -> None:
        c.stage1.predict_with = "both"

    return {"stage 1": lambda c: None, "stage 1, fixed balance": fixed, "stage 1, no centre target": no_center,
            "stage 1, mean of both heads": both_heads}


def run(seeds: int, n: int, epochs: int, stage2_epochs: int, imbalance: float = 1.0, only: Optional[str] = None) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {}

    def add(name: str, y: np.ndarray, pred: np.ndarray, seconds: float) -> None:
        results.setdefault(name, []).append({**evaluate(y, pred), "seconds": seconds})

    for seed in range(seeds):
        data = make_synthetic(SyntheticSpec(n=n, imbalance=imbalance), seed=seed)
        base = Config()
        base.stage1.epochs, base.stage2.epochs, base.stage2.lr = epochs, stage2_epochs, 1e-3
        t = time.perf_counter()
        km = ops.kmeans(data.embeddings, data.spec.k, iters=100, restarts=3, seed=seed)
        add("k-means", data.labels, km.labels.numpy(), time.perf_counter() - t)
        for name, change in _variants().items():
            if only and name not in only.split(";"):
                continue
            cfg = copy.deepcopy(base)
            change(cfg)
            stage = 2 if name == "stage 1" else 1
            t = time.perf_counter()
            m = SemanticClusterer(data.spec.k, clip=data.encoder, config=cfg, stage=stage, seed=seed, device="cpu")
            m.fit(TensorSource(data.raw), nouns=data.noun_embeddings)
            add(name, data.labels, m.stage1_labels_, m.history_["seconds"]["stage1"])
            if stage == 2:
                add("stage 2 (encoder)", data.labels, m.labels_, m.history_["seconds"]["stage2"])
        if only:
            continue
        cfg = copy.deepcopy(base)
        m = SemanticClusterer(data.spec.k, clip=None, config=cfg, seed=seed, device="cpu")
        m.fit(data.embeddings, nouns=data.noun_embeddings)
        add("stage 2 (adapter)", data.labels, m.labels_, m.history_["seconds"]["stage2"])
    return results


def _fmt(vals: list[float]) -> str:
    return f"{statistics.mean(vals):.3f} ± {statistics.pstdev(vals):.3f}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--stage2-epochs", type=int, default=10)
    p.add_argument("--imbalance", type=float, default=1.0, help="largest / smallest class size")
    p.add_argument("--only", help="semicolon-separated stage-1 variant names to run (skips the adapter run)")
    p.add_argument("--quick", action="store_true", help="one seed, n=2000, 10 + 3 epochs (a smoke run)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.n, a.epochs, a.stage2_epochs = 1, 2000, 10, 3
    res = run(a.seeds, a.n, a.epochs, a.stage2_epochs, a.imbalance, a.only)
    print(f"synthetic set, n={a.n}, imbalance {a.imbalance}, {a.seeds} seeds, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'variant':28s} {'ACC':>14s} {'NMI':>14s} {'ARI':>14s} {'seconds':>8s}")
    for name, rows in res.items():
        print(f"{name:28s} {_fmt([r['acc'] for r in rows]):>14s} {_fmt([r['nmi'] for r in rows]):>14s} "
              f"{_fmt([r['ari'] for r in rows]):>14s} {statistics.mean(r['seconds'] for r in rows):8.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
