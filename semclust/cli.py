"""The `semclust` command: demo, embed, fit, predict, evaluate, bench."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger("semclust")

USER_ERRORS = (ValueError, FileNotFoundError, TypeError, RuntimeError, FileExistsError, NotADirectoryError)


def _seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _table(rows: list[dict], cols: Sequence[str]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    line = lambda r: "  ".join(str(r[c]).ljust(widths[c]) if i == 0 else str(r[c]).rjust(widths[c]) for i, c in enumerate(cols))  # noqa: E731
    head = line({c: c for c in cols})
    return "\n".join([head, "-" * len(head), *(line(r) for r in rows)])


# ---- demo ------------------------------------------------------------------------------

def cmd_demo(a: argparse.Namespace) -> int:
    import torch

    from . import ops
    from .api import SemanticClusterer
    from .config import Config
    from .inputs.sources import TensorSource
    from .metrics import evaluate
    from .synthetic import SyntheticSpec, make_synthetic

    _seed_everything(a.seed)
    spec = SyntheticSpec(n=a.n, k=a.k)
    data = make_synthetic(spec, seed=a.seed)
    print(f"synthetic set: {spec.n} images in {spec.k} clusters, {len(data.nouns)} nouns "
          f"({spec.k * spec.nouns_per_class} on-topic), feature dim {spec.dim}; seed {a.seed}")
    rows = []

    def row(name: str, labels: np.ndarray, seconds: float) -> None:
        m = evaluate(data.labels, labels)
        rows.append({"method": name, "ACC": f"{m['acc']:.3f}", "NMI": f"{m['nmi']:.3f}", "ARI": f"{m['ari']:.3f}",
                     "time": f"{seconds:.1f}s"})

    cfg = Config()
    cfg.stage1.epochs = a.epochs
    cfg.stage2.epochs = a.stage2_epochs
    # the synthetic encoder is one linear layer trained from scratch-scale steps; CLIP's
    # 5e-5 (for pre-trained transformer blocks) would barely move it
    cfg.stage2.lr = 1e-3
    t0 = time.perf_counter()
    km = ops.kmeans(data.embeddings, spec.k, iters=cfg.semantic.kmeans_iters, restarts=cfg.semantic.kmeans_restarts, seed=a.seed)
    row("k-means (frozen features)", km.labels.numpy(), time.perf_counter() - t0)
    t0 = time.perf_counter()
    model = SemanticClusterer(spec.k, clip=data.encoder, config=cfg, seed=a.seed, progress=not a.no_progress, device="cpu")
    model.fit(TensorSource(data.raw), nouns=data.noun_embeddings)
    s = model.history_["seconds"]
    # stage 1 is every phase up to and including the heads' training (k-means and kNN too)
    row("stage 1 (cross-modal heads)", model.stage1_labels_, sum(t for name, t in s.items() if name != "stage2"))
    row("stage 2 (self-enhanced)", model.labels_, s["stage2"])
    print(_table(rows, ["method", "ACC", "NMI", "ARI", "time"]))
    print(f"total {time.perf_counter() - t0 + float(rows[0]['time'][:-1]):.1f}s on {torch.get_num_threads()} threads; "
          f"nouns kept by semantic-space selection: {model.history_['nouns_selected']} of {model.history_['nouns_total']}")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "history": model.history_}, indent=2, default=float))
    return 0


# ---- embed / fit / predict / evaluate ----------------------------------------------------

def cmd_embed(a: argparse.Namespace) -> int:
    from .clip.encoder import ClipEncoder
    from .inputs.sources import ImageSource

    src = ImageSource.from_folder(a.images)
    enc = ClipEncoder.load(a.clip, a.pretrained, device=a.device or "cpu")
    res = enc.embed_to_store(src, a.out, batch_size=a.batch_size, num_workers=a.workers, progress=not a.no_progress,
                             shard_rows=a.shard_rows)
    print(f"wrote {len(res.store)} embeddings (dim {res.store.dim}) to {a.out}")
    if res.skipped.count:
        print(str(res.skipped))
    return 0


def _read_nouns(spec: Optional[str]):
    if spec and Path(spec).suffix.lower() in (".npy", ".pt", ".pth", ".safetensors"):
        from .inputs.embeddings import load_embeddings

        return load_embeddings(spec)
    return spec


def cmd_fit(a: argparse.Namespace) -> int:
    from .api import SemanticClusterer
    from .config import Config
    from .runtime.distributed import init_from_env
    from .runtime.report import Phases

    _seed_everything(a.seed)
    info = init_from_env()  # under torchrun: join the group; the fit then shards its phases
    cfg = Config.from_dict(json.loads(Path(a.config).read_text())) if a.config else Config()
    if a.epochs is not None:
        cfg.stage1.epochs = a.epochs
    nouns = _read_nouns(a.nouns)
    model = SemanticClusterer(a.k, clip=a.clip, pretrained=a.pretrained, nouns="default" if nouns is None else nouns,
                              stage=a.stage, config=cfg, device=a.device or (str(info.device) if info.world > 1 else None),
                              seed=a.seed, progress=not a.no_progress and info.rank == 0,
                              checkpoint_dir=a.out, resume=a.resume)
    model.fit(a.input)
    if info.rank != 0:  # every rank holds the same model; one writes it
        return 0
    out = model.save(a.out)
    np.save(out / "labels.npy", model.labels_)
    counts = np.bincount(model.labels_[model.labels_ >= 0], minlength=a.k)
    print(f"fitted {len(model.labels_)} samples into {a.k} clusters ({model.mode_}); sizes {counts.tolist()}")
    if model.skipped_.count:
        print(str(model.skipped_))
    print(f"model and labels.npy written to {out}")
    if not a.no_progress:
        print(Phases.format(model.history_["phases"]))
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from .api import SemanticClusterer

    model = SemanticClusterer.load(a.run, device=a.device)
    labels = model.predict(a.input)
    np.save(a.out, labels)
    print(f"predicted {len(labels)} labels ({int((labels < 0).sum())} unreadable) -> {a.out}")
    return 0


def _grid(items: list[str], labels: np.ndarray, conf: np.ndarray, out: str, per_cluster: int = 8, size: int = 64) -> None:
    from PIL import Image

    clusters = sorted(set(labels[labels >= 0].tolist()))
    canvas = Image.new("RGB", (per_cluster * size, max(1, len(clusters)) * size), "white")
    for r, c in enumerate(clusters):
        members = np.nonzero(labels == c)[0]
        for j, i in enumerate(members[np.argsort(-conf[members])][:per_cluster]):
            try:
                with Image.open(items[i]) as im:
                    canvas.paste(im.convert("RGB").resize((size, size)), (j * size, r * size))
            except OSError as e:
                log.warning("grid: cannot draw %s (%s)", items[i], e)
    canvas.save(out)


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .api import SemanticClusterer
    from .inputs.embeddings import load_labels
    from .inputs.sources import ImageSource
    from .metrics import evaluate

    model = SemanticClusterer.load(a.run, device="cpu")
    pred = np.load(a.predictions) if a.predictions else model.labels_
    truth = load_labels(a.labels)
    if len(truth) != len(pred):
        raise ValueError(f"--labels has {len(truth)} entries but the predictions have {len(pred)}")
    ok = pred >= 0
    m = evaluate(truth[ok], pred[ok])
    print(f"ACC {m['acc']:.4f}  NMI {m['nmi']:.4f}  ARI {m['ari']:.4f}  on {int(ok.sum())} samples"
          + (f" ({int((~ok).sum())} unreadable left out)" if (~ok).any() else ""))
    if a.grid:
        if not a.images:
            raise ValueError("--grid needs --images (the folder the model was fitted on)")
        src = ImageSource.from_folder(a.images)
        if len(src) != len(pred):
            raise ValueError(f"--images has {len(src)} images but the model labelled {len(pred)}")
        _grid(src.items, pred, model.confidences_, a.grid)
        print(f"grid of samples per cluster -> {a.grid}")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    try:
        module = importlib.import_module(f"benchmarks.bench_{a.what}")
    except ImportError as e:
        raise RuntimeError(f"`semclust bench {a.what}` runs benchmarks/bench_{a.what}.py from a source checkout "
                           f"(run it from the repository root): {e}") from None
    return int(module.main((["--json", a.json] if a.json else []) + (["--quick"] if a.quick else [])) or 0)


def cmd_build_ext(a: argparse.Namespace) -> int:
    from . import csrc as ext

    part = "cuda" if a.cuda else "cpu"
    print(f"cache: {ext.cache_dir()} (override with SEMCLUST_EXT_DIR)")
    was_built = ext.is_built(part)
    t0 = time.perf_counter()
    try:
        path = ext.build(cuda=a.cuda, verbose=a.verbose)
    except ext.ExtensionBuildError as e:  # the whole message: it carries the compiler's errors and the fix
        print(f"semclust build-ext: error: {e}", file=sys.stderr)
        return 2
    what = "already built" if was_built else f"built in {time.perf_counter() - t0:.0f}s"
    print(f"{part.upper()} extension {ext.build_name(part)}: {what}\n  {path}")
    print(f"ext backend ops: {', '.join(ext.REGISTERED_OPS)} (chosen by default from now on; "
          "SEMCLUST_BACKEND=torch opts out)")
    return 0


# ---- parser --------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    from .config import ChunkConfig
    from .inputs.store import DEFAULT_SHARD_ROWS

    p = argparse.ArgumentParser(prog="semclust", description="Self-enhanced image clustering with cross-modal semantic consistency.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, clip: bool = False) -> None:
        sp.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        sp.add_argument("--no-progress", action="store_true", help="hide progress bars")
        sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
        if clip:
            sp.add_argument("--clip", default="ViT-B-32", help="open_clip model name or model-config .json")
            sp.add_argument("--pretrained", default="openai", help="open_clip pretrained tag or local checkpoint file")

    d = sub.add_parser("demo", help="run the method on the built-in synthetic set and print k-means vs stage 1 vs stage 2")
    common(d)
    d.add_argument("--n", type=int, default=5000, help="images (default 5000)")
    d.add_argument("-k", type=int, default=10, help="clusters (default 10)")
    d.add_argument("--epochs", type=int, default=30, help="stage-1 epochs (default 30)")
    d.add_argument("--stage2-epochs", type=int, default=10, help="stage-2 epochs (default 10)")
    d.add_argument("--json", help="also write the table and history as JSON here")
    d.set_defaults(fn=cmd_demo)

    e = sub.add_parser("embed", help="encode an image folder into an fp16 embedding store (resumable)")
    e.add_argument("images", help="image folder")
    e.add_argument("--out", required=True, help="store directory")
    e.add_argument("--batch-size", type=int, default=ChunkConfig.encode_batch_size)
    e.add_argument("--workers", type=int, default=min(4, max(1, (os.cpu_count() or 2) - 1)),
                   help="worker processes decoding images while the model encodes (default: min(4, cores - 1); 0: none)")
    e.add_argument("--shard-rows", type=int, default=DEFAULT_SHARD_ROWS, help="rows per shard file (a killed run resumes at the last whole shard)")
    common(e, clip=True)
    e.set_defaults(fn=cmd_embed)

    f = sub.add_parser("fit", help="cluster images, an image folder, or embeddings; write the model and labels")
    f.add_argument("input", help="image folder, embedding store, or .npy/.pt/.safetensors embeddings")
    f.add_argument("-k", type=int, required=True, help="number of clusters")
    f.add_argument("--out", required=True, help="run directory (model + labels.npy)")
    f.add_argument("--nouns", help="'default', 'wordnet', a word file, or noun embeddings (.npy/.pt/.safetensors)")
    f.add_argument("--stage", type=int, choices=(1, 2), default=2)
    f.add_argument("--epochs", type=int, help="stage-1 epochs (default from the config)")
    f.add_argument("--config", help="JSON file with config overrides (see semclust.config)")
    f.add_argument("--resume", action="store_true", help="continue a killed run in RUN (same input and settings): finished phases are reused, stage 1 and 2 continue from their last epoch")
    common(f, clip=True)
    f.set_defaults(fn=cmd_fit)

    pr = sub.add_parser("predict", help="label new images or embeddings with a fitted run")
    pr.add_argument("run", help="run directory written by `semclust fit`")
    pr.add_argument("input", help="images or embeddings, as for fit")
    pr.add_argument("--out", required=True, help="output .npy of labels")
    common(pr)
    pr.set_defaults(fn=cmd_predict)

    ev = sub.add_parser("evaluate", help="ACC / NMI / ARI of a run against ground-truth labels")
    ev.add_argument("run", help="run directory")
    ev.add_argument("--labels", required=True, help="ground truth (.npy, or .txt/.csv with one int per line)")
    ev.add_argument("--predictions", help="labels .npy to score instead of the run's own")
    ev.add_argument("--grid", help="write a PNG grid of the most confident images per cluster")
    ev.add_argument("--images", help="image folder of the run (for --grid)")
    common(ev)
    ev.set_defaults(fn=cmd_evaluate)

    b = sub.add_parser("bench", help="benchmarks against peers: ops, step (fused training step), scale (streaming fit, "
                                     "100k-1M), method (accuracy of each variant)")
    b.add_argument("what", choices=("ops", "step", "scale", "method"))
    b.add_argument("--json", help="write results as JSON")
    b.add_argument("--quick", action="store_true", help="small shapes, about a minute")
    b.set_defaults(fn=cmd_bench)

    x = sub.add_parser("build-ext", help="compile the C++ (and with --cuda, CUDA) extension ahead of time")
    x.add_argument("--cuda", action="store_true", help="also build the CUDA kernels (needs nvcc and a CUDA build of torch)")
    x.set_defaults(fn=cmd_build_ext)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        print("semclust: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if args.verbose:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"semclust {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
