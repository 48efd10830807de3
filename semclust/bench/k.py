"""Estimating K (`semclust.method.k_search.estimate_k`) on the named synthetic scenarios.

Per scenario and seed: the true K, the estimate of each criterion (the chosen one,
`cross_modal_gap`, first; the others are the argmax of their column of the same run's
scores), whether the chosen estimate is within +-20% of the true K ("ok"), whether its gap
stands out from the null reference (`KSearch.significant`), and seconds.
"superclass" has 20 classes of 4 sub-classes each whose nouns name only the sub-classes:
"ok" counts 20 only, "ok_any_level" counts 20 or 80.

    python -m semclust.bench.k [--scenarios gap,k100] [--seeds 3] [--first-seed 0] [--sample N] [--acc] [--json out.json]

--json also keeps every run's score table (`KSearch.scores`).

With --acc, also stage-1 ACC (`method.stage1.train_stage1`, the default Config, on all
rows) at the estimate and at the true K, and the seconds of that fit at the true K
(counterparts, kNN, stage 1: the search's cost in units of a fit).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Optional, Sequence

import torch
from torch.nn import functional as F

from semclust import ops
from semclust.config import Config
from semclust.method import counterparts, stage1
from semclust.method.k_search import CRITERIA, choose, estimate_k
from semclust.metrics import cluster_accuracy
from semclust.synthetic import make_scenario

# the scenarios: K = 10 (balanced, modality gap, long tails), 20 (superclass), 100
DEFAULT = "balanced,gap,superclass,longtail10,longtail100,k100"
LEVELS = {"superclass": (20, 80)}  # a two-level hierarchy: the sub-classes are a defensible K too


def within(true_k: int, k: int, tol: float = 0.2) -> bool:
    return abs(k - true_k) <= tol * true_k


def stage1_acc(u: torch.Tensor, nouns: torch.Tensor, y, k: int, cfg: Config, seed: int) -> float:
    space = counterparts.select_nouns(u, nouns, k, cfg.semantic, seed=seed, chunks=cfg.chunks)
    v = counterparts.text_counterparts(u, space.bank(nouns), cfg.counterparts, cfg.chunks)
    m = min(cfg.neighbours.k, u.shape[0] - 1)
    r = stage1.train_stage1(u, v, k, ops.knn(u, m)[1], ops.knn(v, m)[1], cfg.stage1, seed=seed, progress=False)
    return cluster_accuracy(y, r.labels.numpy())


def run(name: str, seed: int, acc: bool, search: Optional[dict] = None) -> dict:
    """One scenario and seed; `search`: options of the `k_search` config section to change."""
    data = make_scenario(name, seed)
    u = F.normalize(data.embeddings.float(), dim=1)
    nouns = data.noun_embeddings.float()
    cfg = Config.from_dict({"k_search": search or {}})
    t = time.perf_counter()
    ks = estimate_k(u, nouns, (2, 200), cfg, seed=seed)
    seconds = time.perf_counter() - t
    row = {"scenario": name, "seed": seed, "n": u.shape[0], "true_k": data.spec.k, "k": ks.k,
           "rounds": [r["k0"] for r in ks.rounds], "seconds": seconds, "sample": ks.sample,
           "ok": within(data.spec.k, ks.k), "significant": ks.significant,
           "ok_any_level": any(within(t, ks.k) for t in LEVELS.get(name, (data.spec.k,)))}
    for c in CRITERIA:
        row[c] = int(choose(ks.scores, c)["k"])
    if acc:
        row["acc_at_estimate"] = stage1_acc(u, nouns, data.labels, ks.k, cfg, seed)
        t = time.perf_counter()
        row["acc_at_true_k"] = stage1_acc(u, nouns, data.labels, data.spec.k, cfg, seed)
        row["fit_seconds"] = time.perf_counter() - t  # counterparts + kNN + stage 1 at the true K
    row["scores"] = ks.scores
    return row


def table(rows: list[dict]) -> str:
    cols = ["scenario", "seed", "n", "true_k", "k", *CRITERIA, "ok", "ok_any_level", "significant", "seconds"]
    if rows and "acc_at_estimate" in rows[0]:
        cols += ["acc_at_estimate", "acc_at_true_k", "fit_seconds"]
    out = ["  ".join(f"{c:>17s}" for c in cols)]
    for r in rows:
        out.append("  ".join(f"{r[c]:17.3f}" if isinstance(r[c], float) else f"{str(r[c]):>17s}" for c in cols))
    for key, what in (("ok", "the true K"), ("ok_any_level", "the true K or superclass's 80 sub-classes")):
        ok = sum(r[key] for r in rows)
        out.append(f"within +-20% of {what}: {ok} / {len(rows)} ({ok / max(1, len(rows)):.0%})")
    if rows and "acc_at_estimate" in rows[0]:
        drop = sum(r["acc_at_true_k"] - r["acc_at_estimate"] for r in rows) / len(rows)
        out.append(f"mean ACC at the true K minus ACC at the estimate: {drop:.3f}")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default=DEFAULT, help="comma-separated names of semclust.synthetic.SCENARIOS")
    p.add_argument("--seeds", type=int, default=3, help="seeds first-seed, ..., first-seed + seeds - 1")
    p.add_argument("--first-seed", type=int, default=0, help="e.g. 3 for held-out seeds 3-5 with --seeds 3")
    # the search's options: unset, the k_search config section's defaults
    for name, what in (("sample", "rows searched"), ("rounds", "counterpart rebuilds"),
                       ("restarts", "k-means restarts per K and draw"),
                       ("draws", "k-means seeds and null references per K")):
        p.add_argument(f"--{name}", type=int, help=f"{what} (default: the k_search config section's)")
    p.add_argument("--acc", action="store_true", help="also stage-1 ACC at the estimate and at the true K")
    p.add_argument("--quick", action="store_true", help="the balanced scenario, one seed (a smoke run)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    if a.quick:
        a.scenarios, a.seeds = "balanced", 1
    search = {key: getattr(a, key) for key in ("sample", "rounds", "restarts", "draws") if getattr(a, key) is not None}
    try:  # before any scenario runs
        Config.from_dict({"k_search": search})
    except (TypeError, ValueError) as e:
        p.error(str(e))
    rows = []
    for name in a.scenarios.split(","):
        for seed in range(a.first_seed, a.first_seed + a.seeds):
            rows.append(run(name, seed, a.acc, search))
            print(json.dumps({c: x for c, x in rows[-1].items() if c != "scores"}), flush=True)
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
