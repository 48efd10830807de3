"""Estimating K (`semclust.method.k_search.estimate_k`) on the named synthetic scenarios.

Per scenario and seed: the true K, the estimate of each criterion (the chosen one,
`cross_modal_gap`, first; the others are the argmax of their column of the same run's
scores), whether the chosen estimate is within +-20% of the true K ("ok"), whether its gap
stands out from the null reference (`KSearch.significant`), and seconds.
"superclass" has 20 classes of 4 sub-classes each whose nouns name only the sub-classes:
"ok" counts 20 only, "ok_any_level" counts 20 or 80.

    python -m semclust.bench.k [--scenarios gap,k100] [--seeds 3] [--first-seed 0] [--sample N] [--acc]
                               [--dim 512] [--json out.json]
    python -m semclust.bench.k --scale-rows 100000 1000000 [--workdir DIR]

--json also keeps every run's score table (`KSearch.scores`).

The scenarios have D = 64; CLIP's features have 512 or 768, and the search's cost grows with
D (its k-means are most of it). --dim D turns each scenario into D dimensions by an
orthogonal map: the same cosines, so the same estimate up to rounding, at that width's cost.
--scale-rows times the search alone (no true K) on `bench.scale`'s synthetic store of N rows
(D = 512, fp16, memory-mapped as a fit reads it; written once under --workdir).

With --acc, also stage-1 ACC (`method.stage1.train_stage1`, the default Config, on all
rows) at the estimate and at the true K, and the seconds of that fit at the true K
(counterparts, kNN, stage 1: the search's cost in units of a fit).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.nn import functional as F

from semclust import ops
from semclust.bench import scale
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


def widen(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Unit rows x [n, d] mapped into `dim` >= d dimensions by one fixed matrix with
    orthonormal columns: every cosine is kept."""
    if dim < x.shape[1]:
        raise ValueError(f"dim must be at least the rows' {x.shape[1]} dimensions to keep their cosines, got {dim}")
    q, _ = torch.linalg.qr(torch.randn(dim, x.shape[1], generator=torch.Generator().manual_seed(0), dtype=x.dtype))
    return F.normalize(x @ q.T, dim=1)


def run(name: str, seed: int, acc: bool, search: Optional[dict] = None, dim: Optional[int] = None) -> dict:
    """One scenario and seed; `search`: options of the `k_search` config section to change;
    `dim`: the width to turn the scenario into (`widen`)."""
    data = make_scenario(name, seed)
    u = F.normalize(data.embeddings.float(), dim=1)
    nouns = data.noun_embeddings.float()
    if dim is not None:
        u, nouns = widen(u, dim), widen(nouns, dim)
    cfg = Config.from_dict({"k_search": search or {}})
    t = time.perf_counter()
    ks = estimate_k(u, nouns, (2, 200), cfg, seed=seed)
    seconds = time.perf_counter() - t
    row = {"scenario": name, "seed": seed, "n": u.shape[0], "dim": u.shape[1], "true_k": data.spec.k, "k": ks.k,
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


def scale_run(n: int, workdir: Path, search: Optional[dict] = None) -> dict:
    """The search alone on `bench.scale`'s synthetic store of n rows (D = 512, 1000 latent
    centres, its 20,000-noun bank), read as a fit reads it: memory-mapped fp16 rows."""
    from semclust.inputs.store import open_store
    from semclust.pipeline import store_rows
    from semclust.runtime.workspace import Workspace

    store = open_store(scale.make_store(workdir / f"store-{n}", n), verify=False)
    cfg = Config.from_dict({"k_search": search or {}})
    with Workspace(workdir / f"k-search-{n}", "k-search", fresh=True) as ws:
        u = store_rows(store, ws, cfg, progress=False)
        t = time.perf_counter()
        ks = estimate_k(u, scale.noun_bank(), (2, 200), cfg, seed=0)
        seconds = time.perf_counter() - t
    return {"store_rows": n, "dim": u.shape[1], "k": ks.k, "sample": ks.sample, "significant": ks.significant,
            "seconds": seconds, "scores": ks.scores}


def table(rows: list[dict]) -> str:
    cols = ["scenario", "seed", "n", "dim", "true_k", "k", *CRITERIA, "ok", "ok_any_level", "significant", "seconds"]
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
    p.add_argument("--dim", type=int, help="turn each scenario into this many dimensions (>= its 64) by an "
                                           "orthogonal map: the search's cost at CLIP's width")
    p.add_argument("--scale-rows", type=int, nargs="+", metavar="N",
                   help="instead of the scenarios: the search alone on bench.scale's store of N rows (D = 512)")
    p.add_argument("--workdir", default=scale.WORKDIR,
                   help="where --scale-rows writes its stores (once) and workspaces (bench.scale's default)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    if a.quick:
        a.scenarios, a.seeds = "balanced", 1
    if a.dim is not None and a.dim < 1:
        p.error(f"--dim must be >= 1, got {a.dim}")
    search = {key: getattr(a, key) for key in ("sample", "rounds", "restarts", "draws") if getattr(a, key) is not None}
    try:  # before any scenario runs
        Config.from_dict({"k_search": search})
    except (TypeError, ValueError) as e:
        p.error(str(e))
    if a.scale_rows:
        rows = [scale_run(n, Path(a.workdir), search) for n in a.scale_rows]
        for r in rows:
            print(json.dumps({c: x for c, x in r.items() if c != "scores"}), flush=True)
    else:
        rows = []
        for name in a.scenarios.split(","):
            for seed in range(a.first_seed, a.first_seed + a.seeds):
                rows.append(run(name, seed, a.acc, search, a.dim))
                print(json.dumps({c: x for c, x in rows[-1].items() if c != "scores"}), flush=True)
        print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
