"""Scale: the streaming fit from an embedding store at N = 100k and 1M, and its peers.

    python -m semclust.bench.scale [--quick] [--n 100000 1000000] [--k 100 1000]
                                     [--workdir DIR] [--device cpu|cuda] [--json out.json]
    semclust bench scale [--quick]

Data: synthetic unit vectors in D = 512 around 1000 latent centres, written to an
embedding store (fp16 shards of 65,536 rows, generated chunk by chunk) once per N and
reused for every K; a 20,000-noun bank (half near the latent centres, half random).

Each (N, K) runs `SemanticClusterer(stage=1).fit(store)` in a fresh subprocess, so its
peak RSS is the run's own: the store is memory-mapped, the workspace (counterparts, kNN
lists) lives on disk beside it. Reported per phase, `predict(store)` included: seconds,
peak RSS (VmHWM reset at the phase's start; memory-mapped pages the process touched
count, as the OS counts them) and the sampled peak of anonymous memory. Every setting is
the library's default (k-means iterations and restarts, stage-1 epochs:
`Stage1Config.cluster_visits` at K >= 100) unless `--kmeans-iters`, `--restarts` or
`--epochs` lower it; the kNN search is the library's default too (`neighbours.method =
"auto"`: exact up to 100k rows on a CPU, IVF above; `--knn` forces one). All are printed
with the table; the per-epoch times let other epoch counts be projected.

Peers, in their own subprocess on the same store: faiss k-means (same M centres and
iterations; faiss subsamples 256 rows per centre by default, as our k-means does) and
faiss kNN (IndexFlatIP exact where N allows, IVF-SQfp16 otherwise).

The 10M row is projected from the 1M run: k-means (M = K centres over a sample of 256
rows per centre, then one pass assigning all N) and counterparts, stage 1 and predict
scale linearly, IVF kNN as N^1.5 (nlist ~ sqrt N).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

DIM = 512
LATENT = 1000
NOUNS = 20000
SEED = 0
# where the stores (written once) and workspaces go, for this bench and `bench.k --scale-rows`
WORKDIR = os.environ.get("SEMCLUST_BENCH_DIR", "bench-scale-data")


def _latent(dim: int = DIM) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED)
    return torch.nn.functional.normalize(torch.randn(LATENT, dim, generator=g), dim=1)


def make_store(path: Path, n: int, chunk: int = 65536) -> Path:
    """Write N synthetic rows (latent centre + noise, normalised) to a store, once."""
    from semclust.inputs.store import StoreWriter, is_store, open_store

    # a store cut short by a killed run is rewritten, not reused (reading it needs allow_incomplete)
    if is_store(path):
        old = open_store(path, verify=False, allow_incomplete=True)
        if old.complete and len(old) == n:
            return path
    centres = _latent()
    g = torch.Generator().manual_seed(SEED + 1)
    with StoreWriter(path, "synthetic-scale", None, None, DIM, shard_rows=65536) as w:
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            lab = torch.randint(LATENT, (m,), generator=g)
            x = centres[lab] + 0.045 * torch.randn(m, DIM, generator=g)
            w.append(torch.nn.functional.normalize(x, dim=1), [str(i) for i in range(s, s + m)])
        w.close(source_consumed=n)
    return path


def noun_bank() -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + 2)
    c = _latent()
    near = c[torch.randint(LATENT, (NOUNS // 2,), generator=g)] + 0.05 * torch.randn(NOUNS // 2, DIM, generator=g)
    far = torch.randn(NOUNS - NOUNS // 2, DIM, generator=g)
    return torch.nn.functional.normalize(torch.cat([near, far]), dim=1)


def run_ours(store: Path, k: int, kmeans_iters: int, restarts: int, epochs: int, knn: str, work: Path,
             reuse: bool = False, device: str = "cpu", config: Optional[dict] = None) -> dict:
    from semclust import SemanticClusterer, ops
    from semclust.config import Config
    from semclust.method import neighbours
    from semclust.runtime.report import Phases

    cfg = Config.from_dict(config or {})
    # 0: the config's default
    cfg.semantic.kmeans_iters = kmeans_iters or cfg.semantic.kmeans_iters
    cfg.semantic.kmeans_restarts = restarts or cfg.semantic.kmeans_restarts
    cfg.stage1.epochs = epochs or cfg.stage1.epochs
    cfg.neighbours.method = knn
    if reuse:  # keep the finished counterparts / kNN files, train stage 1 again
        (work / "stage1.ckpt").unlink(missing_ok=True)
    model = SemanticClusterer(k, clip=None, nouns=noun_bank(), stage=1, config=cfg, device=device,
                              checkpoint_dir=work, resume=reuse)
    model.fit(str(store))
    phases = Phases()
    with phases("predict"):
        labels = model.predict(str(store))
    return {"phases": model.history_["phases"] + phases.rows, "epoch_seconds": [r["seconds"] for r in model.history_["stage1"]],
            "clusters_used": int(np.unique(labels).size), "knn_recall": model.history_.get("knn_recall"),
            "nouns_selected": model.history_["nouns_selected"], "backends": ops.resolved_backends(device)}


def run_faiss(store: Path, k_means: int, kmeans_iters: int, knn_k: int, knn: str) -> dict:
    import faiss

    from semclust.config import NeighbourConfig
    from semclust.method import neighbours
    from semclust.runtime.report import peak_rss_mb
    from semclust.inputs.store import open_store

    s = open_store(store, verify=False)
    x = np.concatenate([s.shard(i) for i in range(s.shard_count)]).astype(np.float32)
    out = {}
    t0 = time.perf_counter()
    km = faiss.Kmeans(DIM, k_means, niter=kmeans_iters, spherical=True, seed=SEED)
    km.train(x)
    out["kmeans_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if knn == "exact":
        index = faiss.IndexFlatIP(DIM)
        index.add(x)
        for q in range(0, len(x), 65536):
            index.search(x[q : q + 65536], knn_k + 1)
    else:
        neighbours.knn_lists(torch.from_numpy(x), knn_k, cfg=NeighbourConfig(method="ivf"))
    out["knn_seconds_one_modality"] = time.perf_counter() - t0
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def _child(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    res = subprocess.run([sys.executable, "-m", "semclust.bench.scale", *args], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"bench_scale child {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _project(row: dict, factor: float) -> dict:
    """Seconds of each phase at factor x N, by the scaling laws in the module doc."""
    law = {"knn": 1.5}
    return {p["phase"]: p["seconds"] * factor ** law.get(p["phase"], 1.0) for p in row["ours"]["phases"]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--k", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--quick", action="store_true", help="N = 20k, K = 100, 2 epochs: a few minutes")
    ap.add_argument("--workdir", default=WORKDIR)
    ap.add_argument("--kmeans-iters", type=int, default=0, help="semantic-space k-means iterations (default: the config's)")
    ap.add_argument("--restarts", type=int, default=0, help="k-means restarts (default: the config's)")
    ap.add_argument("--epochs", type=int, default=0, help="stage-1 epochs (default: the config's, cluster_visits at K >= 100)")
    ap.add_argument("--knn", choices=("exact", "ivf", "auto"), default="auto", help="auto: the library's default (neighbours.resolve_method: exact on a GPU or up to "
                         "neighbours.exact_max_rows rows, IVF above)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--device", default="cpu", help="where our fit runs (cuda: the GPU; the store stays on disk)")
    ap.add_argument("--reuse-work", action="store_true",
                    help="keep an earlier run's counterparts and kNN files (their phases then take ~0 s) and train again")
    ap.add_argument("--config", default="{}", metavar="JSON",
                    help='options over the defaults, as in a config file, e.g. \'{"stage1": {"cluster_columns": 0}}\'')
    ap.add_argument("--json")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    if a.child:
        kind, store, *rest = a.child
        if kind == "ours":
            k, iters, restarts, epochs, knn, work, reuse, device, config = rest
            print(json.dumps(run_ours(Path(store), int(k), int(iters), int(restarts), int(epochs), knn, Path(work),
                                      reuse == "1", device, json.loads(config))))
        else:
            m, iters, kk, knn = rest
            print(json.dumps(run_faiss(Path(store), int(m), int(iters), int(kk), knn)))
        return 0

    from semclust.config import Config
    from semclust.method import neighbours

    try:  # checked here, before any store is built
        cfg = Config.from_dict(json.loads(a.config))
    except (ValueError, TypeError) as e:
        ap.error(f"--config: {e}")
    ns, ks = ([20_000], [100]) if a.quick else (a.n, a.k)
    root = Path(a.workdir)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in ns:
        iters = a.kmeans_iters or cfg.semantic.kmeans_iters
        restarts = a.restarts or cfg.semantic.kmeans_restarts
        epochs = a.epochs or (2 if a.quick else 0)  # 0: the config's, per K
        # the library's choice for this N (the peers then run the same kind of search)
        knn = a.knn if a.knn != "auto" else neighbours.resolve_method(n, a.device, cfg.neighbours)
        t0 = time.perf_counter()
        store = make_store(root / f"store-{n}", n)
        print(f"N={n}: store ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        for k in ks:
            work = root / f"work-{n}-{k}"
            if work.exists() and not a.reuse_work:
                shutil.rmtree(work)
            ours = _child(["--child", "ours", str(store), str(k), str(iters), str(restarts), str(epochs), knn, str(work),
                           "1" if a.reuse_work else "0", a.device, a.config])
            row = {"n": n, "k": k, "kmeans_iters": iters, "restarts": restarts,
                   "epochs": len(ours["epoch_seconds"]), "knn": knn,
                   "device": a.device, "config": json.loads(a.config), "ours": ours}
            if not a.no_peers and k == ks[0]:
                m = k if cfg.semantic.method == "pool" else max(k, n // cfg.semantic.images_per_centre)
                row["faiss"] = _child(["--child", "faiss", str(store), str(m), str(iters), "50", knn])
            rows.append(row)
            print(json.dumps(row), flush=True)
    _print(rows)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


def _print(rows: list[dict]) -> None:
    print(f"\n{'N':>9} {'K':>5} {'phase':<13}{'s':>9} {'peak RSS MiB':>13} {'anon MiB':>9}")
    for r in rows:
        for p in r["ours"]["phases"]:
            print(f"{r['n']:>9} {r['k']:>5} {p['phase']:<13}{p['seconds']:>9.1f} {p['peak_rss_mb']:>13.0f} "
                  f"{p.get('peak_anon_mb', float('nan')):>9.0f}")
        if "faiss" in r:
            f = r["faiss"]
            print(f"{r['n']:>9} {'':>5} {'faiss kmeans':<13}{f['kmeans_seconds']:>9.1f}\n"
                  f"{r['n']:>9} {'':>5} {'faiss knn x1':<13}{f['knn_seconds_one_modality']:>9.1f} {f['peak_rss_mb']:>13.0f}")
    for r in rows[:1]:  # every row runs in a child of the same checkout: one line says which backends timed it
        print("op backends: " + ", ".join(f"{op}={b}" for op, b in r["ours"].get("backends", {}).items()))
    for r in rows:
        if r["n"] == 1_000_000:
            proj = _project(r, 10.0)
            print(f"projected N=10M K={r['k']} (same settings): " + ", ".join(f"{p} {s / 3600:.1f} h" for p, s in proj.items()))


if __name__ == "__main__":
    sys.exit(main())
