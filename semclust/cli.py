"""The `semclust` command: demo, embed, fit, predict, evaluate, report, reproduce, bench.

Every expected failure ends in one line on stderr, ``semclust <command>: error: ...``,
and an exit code: 2 for what the user gave (options, paths, config files, model
directories, tensor files), 1 for what the system refused (disk full, permissions).
``--debug`` (or ``-v``) shows the traceback instead; anything unexpected always does. Cheap checks
(option ranges, that named files exist, the config file) run before anything expensive
(a CLIP model, the data) and before any output is created.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import logging
import pickle
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

log = logging.getLogger("semclust")

# exceptions that mean "the input is wrong" (exit 2); any other OSError is the system (exit 1)
USER_ERRORS = (ValueError, TypeError, RuntimeError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError)
SEED_MAX = 2**32 - 1  # numpy's seed range
LABELS_FILE = "labels.npy"
NAMES_SHOWN = 20  # `fit` prints every cluster's names up to this K, the first ones above it


def _seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _k_or_auto(text: str) -> int | str:
    """argparse type of `fit -k`: an int >= 2, or "auto" (estimated, see --k-range)."""
    return "auto" if text == "auto" else _int_in(2)(text)


def _k_range(text: str) -> tuple[int, int]:
    """argparse type of `--k-range MIN,MAX`."""
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"must be MIN,MAX, got {text!r}")
    lo, hi = (_int_in(2)(p.strip()) for p in parts)
    if lo > hi:
        raise argparse.ArgumentTypeError(f"MIN must be <= MAX, got {text!r}")
    return lo, hi


def _int_in(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """argparse type: an int in [low, high], so a bad value is a usage error before any work."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be >= {low}" + (f" and <= {high}" if high is not None else "")
                                             + f", got {value}")
        return value
    return parse


def _path(text: str) -> str:
    """argparse type of a path: "" would mean the current folder, which no one means to give."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _must_exist(path: Optional[str], option: str) -> None:
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"{option} {path!r} does not exist")


def _parent_must_exist(path: Optional[str], option: str) -> None:
    # checked up front: np.save / write_text would only fail after all the work
    if path is not None and not Path(path).absolute().parent.is_dir():
        raise FileNotFoundError(f"{option} {path!r}: folder {str(Path(path).absolute().parent)!r} does not exist")


def _load_tensors(path: str, option: str) -> Any:
    """Embeddings [N, D] from the file the user gave as `option`; a file that is corrupt or
    holds anything but tensors (torch.load runs with weights_only=True, so no code ever
    runs) is one ValueError naming it, not torch's page-long traceback."""
    from .inputs.embeddings import UnsafeTensorFile, load_embeddings

    try:
        return load_embeddings(path)
    except UnsafeTensorFile as e:
        raise ValueError(f"cannot load {option} {path}: not a safe tensor file ({e.reason})") from None
    except ValueError as e:  # load_embeddings' own checks, and numpy's on a bad .npy
        raise ValueError(f"cannot load {option} {path}: {_first_line(e)}") from None


def _read_input(path: str) -> Any:
    """The positional input: an embedding file is loaded here (errors naming it), anything
    else (image folder, store, image file) goes to the library as a path."""
    from .inputs.classify import EMBEDDING_SUFFIXES

    _must_exist(path, "input")
    p = Path(path)
    return _load_tensors(path, "input") if p.is_file() and p.suffix.lower() in EMBEDDING_SUFFIXES else path


_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def _read_config(path: Optional[str]) -> Any:
    from .config import Config

    if path is None:
        return Config()
    try:
        data = json.loads(Path(path).read_text())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, an over-long int
        raise ValueError(f"--config {path} is not valid JSON: {_first_line(e)}") from None
    if not isinstance(data, dict):
        raise TypeError(f"--config {path}: config file must hold a JSON object of sections (e.g. "
                        f'{{"stage1": {{"epochs": 10}}}}), got a JSON {_JSON_KINDS[type(data)]}')
    try:
        return Config.from_dict(data)
    except (ValueError, TypeError) as e:
        raise type(e)(f"--config {path}: {e}") from None


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

    if a.n < a.k:
        raise ValueError(f"--n {a.n} must be at least -k {a.k} (one image per cluster)")
    _parent_must_exist(a.json, "--json")
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
    row("stage 1 (cross-modal heads)", model.stage1_labels_,
        sum(t for name, t in s.items() if name not in ("stage2", "names")))
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


def _read_nouns(spec: Optional[str]) -> Any:
    """--nouns: "default", "wordnet", a word file (read by the library) or noun embeddings
    (loaded here); a missing file fails now, not after the images are encoded."""
    from .inputs.classify import EMBEDDING_SUFFIXES

    if spec is None or spec in ("default", "wordnet"):
        return "default" if spec is None else spec
    if not Path(spec).is_file():
        raise FileNotFoundError(f"--nouns {spec!r} is not 'default', 'wordnet' or an existing file")
    return _load_tensors(spec, "--nouns") if Path(spec).suffix.lower() in EMBEDDING_SUFFIXES else spec


def cmd_fit(a: argparse.Namespace) -> int:
    from .api import SemanticClusterer
    from .runtime.distributed import init_from_env
    from .runtime.report import Phases

    cfg = _read_config(a.config)
    if a.epochs is not None:
        cfg.stage1.epochs = a.epochs
    if Path(a.out).exists() and not Path(a.out).is_dir():
        raise NotADirectoryError(f"--out {a.out!r} exists and is not a directory")
    nouns = _read_nouns(a.nouns)
    x = _fit_inputs(a.input, a.allow_incomplete)
    _seed_everything(a.seed)
    info = init_from_env()  # under torchrun: join the group; the fit then shards its phases
    model = SemanticClusterer(a.k, k_range=a.k_range, clip=a.clip, pretrained=a.pretrained, nouns=nouns,
                              stage=a.stage, config=cfg, device=a.device or (str(info.device) if info.world > 1 else None),
                              seed=a.seed, progress=not a.no_progress and info.rank == 0,
                              checkpoint_dir=a.out, resume=a.resume)
    model.fit(x)
    if info.rank != 0:  # every rank holds the same model; one writes it
        return 0
    out = model.save(a.out)
    np.save(out / LABELS_FILE, model.labels_)
    k = model.n_clusters_
    if model.history_.get("k_search"):
        from .method.k_search import KSearch

        print(f"estimated K = {k} within {tuple(a.k_range)}; the scores of every K tried:\n"
              f"{KSearch(**model.history_['k_search']).table()}")
    counts = np.bincount(model.labels_[model.labels_ >= 0], minlength=k)
    print(f"fitted {len(model.labels_)} samples into {k} clusters ({model.mode_}); sizes {counts.tolist()}")
    print(_names_text(model.cluster_names_, counts))
    if model.skipped_.count:
        print(str(model.skipped_))
    print(f"model and {LABELS_FILE} written to {out}")
    if not a.no_progress:
        print(Phases.format(model.history_["phases"]))
    return 0


def _names_text(names: list[list[tuple[str, float]]], sizes: np.ndarray) -> str:
    """One line per cluster, "cluster 3 (512): dog 0.412, puppy 0.398, ..."; above
    NAMES_SHOWN clusters the first NAMES_SHOWN // 2 (semclust.json holds them all)."""
    shown = len(names) if len(names) <= NAMES_SHOWN else NAMES_SHOWN // 2
    lines = ["cluster names (nearest nouns to each cluster's text-side centre, cosine):"]
    lines += [f"  cluster {c} ({int(sizes[c])}): " + (", ".join(f"{n} {s:.3f}" for n, s in names[c]) or "(empty)")
              for c in range(shown)]
    if shown < len(names):
        lines.append(f"  ... {len(names) - shown} more clusters: field cluster_names of semclust.json")
    return "\n".join(lines)


def _fit_inputs(path: str, allow_incomplete: bool) -> Any:
    """The classified input of `fit` (`inputs.classify.Inputs`), checked before any model
    is built; an embedding store that `embed` is still writing is opened only with
    --allow-incomplete."""
    from .inputs.classify import as_inputs
    from .inputs.store import IncompleteStoreError, has_manifest, open_store

    x = _read_input(path)
    is_store = isinstance(x, str) and Path(x).is_dir() and has_manifest(x)
    if allow_incomplete and not is_store:
        raise ValueError(f"--allow-incomplete applies to an embedding store; input {path!r} is not one")
    if allow_incomplete:
        return as_inputs(open_store(x, allow_incomplete=True))
    try:
        return as_inputs(x)
    except IncompleteStoreError as e:
        # the library names its keyword argument; here the option is what to pass
        raise IncompleteStoreError(str(e).replace("allow_incomplete=True", "--allow-incomplete")) from None


def cmd_predict(a: argparse.Namespace) -> int:
    from .api import SemanticClusterer
    from .inputs.classify import as_inputs

    out = _labels_path(a.out)
    _must_exist(a.run, "run directory")
    _parent_must_exist(a.json, "--json")
    # classified before the model is loaded: a bad input fails before CLIP is built
    x = as_inputs(_read_input(a.input))
    model = SemanticClusterer.load(a.run, device=a.device)
    labels = model.predict(x)
    np.save(out, labels)
    print(f"predicted {len(labels)} labels ({int((labels < 0).sum())} unreadable) -> {out}")
    if a.json:
        summary = {"labels": str(out), "samples": len(labels), "unreadable": int((labels < 0).sum()),
                   "sizes": np.bincount(labels[labels >= 0], minlength=model.n_clusters).tolist(),
                   "cluster_names": model.cluster_names_}
        Path(a.json).write_text(json.dumps(summary, indent=2))
        print(f"summary -> {a.json}")
    return 0


def _labels_path(out: str) -> Path:
    """The file `predict --out` writes: inside an existing folder, FOLDER/labels.npy;
    otherwise the name with .npy added when it lacks it (as np.save would)."""
    p = Path(out)
    if p.is_dir():
        return p / LABELS_FILE
    _parent_must_exist(out, "--out")
    return p if p.suffix == ".npy" else p.with_name(p.name + ".npy")


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

    if a.grid and not a.images:
        raise ValueError("--grid needs --images (the folder the model was fitted on)")
    _must_exist(a.run, "run directory")
    _must_exist(a.labels, "--labels")
    _must_exist(a.predictions, "--predictions")
    _must_exist(a.images, "--images")
    _parent_must_exist(a.grid, "--grid")
    truth = load_labels(a.labels)
    given = np.load(a.predictions, allow_pickle=False) if a.predictions else None  # before the slower model
    model = SemanticClusterer.load(a.run, device="cpu")
    pred = model.labels_ if given is None else given
    if len(truth) != len(pred):
        raise ValueError(f"--labels has {len(truth)} entries but the predictions have {len(pred)}")
    ok = pred >= 0
    m = evaluate(truth[ok], pred[ok])
    print(f"ACC {m['acc']:.4f}  NMI {m['nmi']:.4f}  ARI {m['ari']:.4f}  on {int(ok.sum())} samples"
          + (f" ({int((~ok).sum())} unreadable left out)" if (~ok).any() else ""))
    if a.grid:
        src = ImageSource.from_folder(a.images)
        if len(src) != len(pred):
            raise ValueError(f"--images has {len(src)} images but the model labelled {len(pred)}")
        _grid(src.items, pred, model.confidences_, a.grid)
        print(f"grid of samples per cluster -> {a.grid}")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from .report import write_report

    _must_exist(a.run, "run directory")
    _must_exist(a.images, "--images")
    _must_exist(a.labels, "--labels")
    _parent_must_exist(a.out, "--out")
    if Path(a.out).is_dir():
        raise IsADirectoryError(f"--out {a.out!r} is a directory; give the HTML file to write")
    r = write_report(a.run, a.out, images=a.images, labels=a.labels, per_cluster=a.per_cluster)
    print(f"report of {r.rows} rows in {r.clusters} clusters ({r.thumbnails} thumbnails) -> {r.path}")
    return 0


def _percent(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.1f}"


def cmd_reproduce(a: argparse.Namespace) -> int:
    from .reproduce import METRICS, PUBLISHED_BY, reproduce

    cfg = _read_config(a.config)
    if a.epochs is not None:
        cfg.stage1.epochs = a.epochs
    if a.stage2_epochs is not None:
        cfg.stage2.epochs = a.stage2_epochs
    out = Path(a.out or f"semclust-reproduce-{a.dataset}")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} exists and is not a directory")
    _must_exist(a.root, "--root")
    _parent_must_exist(a.json, "--json")
    nouns = _read_nouns(a.nouns)
    _seed_everything(a.seed)
    r = reproduce(a.dataset, a.root, out, pretrained=a.pretrained, clip=a.clip, config=cfg, nouns=nouns, stage=a.stage,
                  seed=a.seed, device=a.device, batch_size=a.batch_size, workers=a.workers, resume=a.resume,
                  progress=not a.no_progress)
    view = r.preprocess
    print(f"{r.title} ({r.dataset}): K = {r.k}, {r.splits['train']['images']} train and {r.splits['test']['images']} "
          f"test images; CLIP {r.clip} ({r.pretrained}); images: shorter side to {view['resize']}, centre crop "
          f"{'x'.join(map(str, view['crop']))} ({view['interpolation']})")
    for name, split in r.splits.items():
        print(f"{name} embeddings: {split['store']} ({'encoded now' if split['encoded_now'] else 'cached'})")
    for note in r.notes:
        print(f"note: {note}")
    rows = [{"method": row["method"], **{m.upper(): _percent(row[m]) for m in METRICS},
             "seconds": "–" if row["seconds"] is None else f"{row['seconds']:.1f}",
             "published": "–" if row["published"] is None else " / ".join(_percent(row["published"][m]) for m in METRICS)}
            for row in r.rows]
    print(f"ACC / NMI / ARI in percent on the test split; published: {PUBLISHED_BY}"
          + ("; stage 2 not run (--stage 1)" if a.stage == 1 else ""))
    print(_table(rows, ["method", "ACC", "NMI", "ARI", "seconds", "published"]))
    if a.json:
        Path(a.json).write_text(json.dumps(r.to_dict(), indent=2))
        print(f"results -> {a.json}")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    # the benchmarks ship in the package (semclust.bench), so this works from an installed copy
    module = importlib.import_module(f"semclust.bench.{a.what}")
    args = list(a.args) + (["--json", a.json] if a.json else []) + (["--quick"] if a.quick else [])
    return int(module.main(args) or 0)


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
    from .inputs.benchmarks import BENCHMARKS
    from .inputs.store import DEFAULT_SHARD_ROWS

    p = argparse.ArgumentParser(prog="semclust", description="Self-enhanced image clustering with cross-modal semantic consistency.",
                                epilog="An error is one line on stderr; exit code 2: bad arguments or input, 1: the system "
                                       "refused (disk full, permissions). --debug shows its traceback.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line "
                                                        "(as -v does, without the log)")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, clip: bool = False, weights_required: bool = False) -> None:
        sp.add_argument("--seed", type=_int_in(0, SEED_MAX), default=0, help="random seed (default 0)")
        sp.add_argument("--no-progress", action="store_true", help="hide progress bars")
        sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
        if clip:
            sp.add_argument("--clip", default="ViT-B-32", help="open_clip model name or model-config .json")
            weights = {"required": True} if weights_required else {"default": "openai"}
            sp.add_argument("--pretrained", **weights, help="open_clip pretrained tag or local checkpoint file")

    def encoding(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--batch-size", type=_int_in(1), default=ChunkConfig.encode_batch_size)
        sp.add_argument("--workers", type=_int_in(0), default=min(4, max(1, (os.cpu_count() or 2) - 1)),
                        help="worker processes decoding images while the model encodes (default: min(4, cores - 1); 0: none)")

    d = sub.add_parser("demo", help="run the method on the built-in synthetic set and print k-means vs stage 1 vs stage 2")
    common(d)
    d.add_argument("--n", type=_int_in(2), default=5000, help="images (default 5000)")
    d.add_argument("-k", type=_int_in(2), default=10, help="clusters (default 10)")
    d.add_argument("--epochs", type=_int_in(0), default=30, help="stage-1 epochs (default 30)")
    d.add_argument("--stage2-epochs", type=_int_in(0), default=10, help="stage-2 epochs (default 10)")
    d.add_argument("--json", type=_path, help="also write the table and history as JSON here")
    d.set_defaults(fn=cmd_demo)

    e = sub.add_parser("embed", help="encode an image folder into an fp16 embedding store (resumable)")
    e.add_argument("images", type=_path, help="image folder")
    e.add_argument("--out", type=_path, required=True, help="store directory")
    encoding(e)
    e.add_argument("--shard-rows", type=_int_in(1), default=DEFAULT_SHARD_ROWS, help="rows per shard file (a killed run resumes at the last whole shard)")
    common(e, clip=True)
    e.set_defaults(fn=cmd_embed)

    f = sub.add_parser("fit", help="cluster images, an image folder, or embeddings; write the model and labels")
    f.add_argument("input", type=_path, help="image folder, embedding store, or .npy/.pt/.safetensors embeddings")
    f.add_argument("-k", type=_k_or_auto, required=True, help="number of clusters, or auto (estimated within --k-range)")
    f.add_argument("--k-range", type=_k_range, default=(2, 200), metavar="MIN,MAX",
                   help="the K searched by -k auto (default 2,200)")
    f.add_argument("--out", type=_path, required=True, help="run directory (model + labels.npy)")
    f.add_argument("--nouns", type=_path, help="'default', 'wordnet', a word file, or noun embeddings (.npy/.pt/.safetensors)")
    f.add_argument("--stage", type=int, choices=(1, 2), default=2)
    f.add_argument("--epochs", type=_int_in(0), help="stage-1 epochs (default from the config; at K >= 100 at most, see stage1.cluster_visits)")
    f.add_argument("--config", type=_path, help="JSON file with config overrides (see semclust.config)")
    f.add_argument("--resume", action="store_true", help="continue a killed run in RUN (same input and settings): finished phases are reused, stage 1 and 2 continue from their last epoch")
    f.add_argument("--allow-incomplete", action="store_true",
                   help="fit the rows an embedding store holds so far while `semclust embed` is still writing it "
                        "(or was interrupted); without it an incomplete store is an error")
    common(f, clip=True)
    f.set_defaults(fn=cmd_fit)

    pr = sub.add_parser("predict", help="label new images or embeddings with a fitted run")
    pr.add_argument("run", type=_path, help="run directory written by `semclust fit`")
    pr.add_argument("input", type=_path, help="images or embeddings, as for fit")
    pr.add_argument("--out", type=_path, required=True,
                    help=f"labels file (.npy is added when missing); an existing folder gets FOLDER/{LABELS_FILE}. "
                         "The path written is printed")
    pr.add_argument("--json", type=_path, help="also write a JSON summary here: the labels file, cluster sizes and "
                                               "the run's cluster names ([name, score] lists, null for a run saved "
                                               "without names)")
    common(pr)
    pr.set_defaults(fn=cmd_predict)

    ev = sub.add_parser("evaluate", help="ACC / NMI / ARI of a run against ground-truth labels")
    ev.add_argument("run", type=_path, help="run directory")
    ev.add_argument("--labels", type=_path, required=True, help="ground truth (.npy, or .txt/.csv with one int per line)")
    ev.add_argument("--predictions", type=_path, help="labels .npy to score instead of the run's own")
    ev.add_argument("--grid", type=_path, help="write a PNG grid of the most confident images per cluster")
    ev.add_argument("--images", type=_path, help="image folder of the run (for --grid)")
    common(ev)
    ev.set_defaults(fn=cmd_evaluate)

    rp = sub.add_parser("report", help="one self-contained HTML page about a run: clusters, confidences, "
                                       "thumbnails, metrics against ground truth, settings and phase times")
    rp.add_argument("run", type=_path, help="run directory written by `semclust fit`")
    rp.add_argument("--images", type=_path, help="the input the run was fitted on (image folder, or a store of "
                                                 "image files), for thumbnails")
    rp.add_argument("--labels", type=_path, help="ground truth (.npy, or .txt/.csv with one int per line): "
                                                 "ACC / NMI / ARI and a confusion matrix")
    rp.add_argument("--out", type=_path, required=True, help="the HTML file to write")
    # report.PER_CLUSTER, written out: importing report here would load scipy and jinja2 for every command
    rp.add_argument("--per-cluster", type=_int_in(0), default=8,
                    help="thumbnails per cluster, half most and half least confident (default 8; 2000 in all at most)")
    rp.set_defaults(fn=cmd_report)

    rr = sub.add_parser("reproduce", help="a paper benchmark from its usual layout: k-means, TAC (training-free, "
                                          "heads), stage 1 and stage 2 beside TAC's published ACC / NMI / ARI",
                        description="Reads DATASET from --root (never downloads), caches its embeddings under --out, "
                                    "trains every method on the train split and scores it on the test split "
                                    "(semclust.reproduce explains the protocol and the preprocessing).")
    rr.add_argument("dataset", choices=BENCHMARKS, help="the benchmark; K is its class count")
    rr.add_argument("--root", type=_path, required=True,
                    help="folder holding the dataset in its usual layout (semclust.inputs.benchmarks.load_benchmark)")
    rr.add_argument("--out", type=_path, help="embedding stores and the fit's working files "
                                              "(default ./semclust-reproduce-DATASET); a rerun encodes nothing again")
    rr.add_argument("--json", type=_path, help="also write the results as JSON here")
    rr.add_argument("--stage", type=int, choices=(1, 2), default=2, help="1 leaves out stage 2 (no images are "
                                                                          "read after the encoding)")
    rr.add_argument("--epochs", type=_int_in(0), help="stage-1 epochs (default from the config; at K >= 100 at most, see stage1.cluster_visits)")
    rr.add_argument("--stage2-epochs", type=_int_in(0), help="stage-2 epochs (default from the config)")
    rr.add_argument("--nouns", type=_path, help="'default', 'wordnet', a word file, or noun embeddings (.npy/.pt/.safetensors)")
    rr.add_argument("--config", type=_path, help="JSON file with config overrides of the semclust fit (see semclust.config)")
    rr.add_argument("--resume", action="store_true", help="continue a killed run in --out")
    encoding(rr)
    common(rr, clip=True, weights_required=True)
    rr.set_defaults(fn=cmd_reproduce)

    b = sub.add_parser("bench", help="benchmarks against peers: ops, step (fused training step), scale (streaming fit, "
                                     "100k-1M), method (accuracy of each variant beside TAC), k (n_clusters='auto')",
                       description="Runs semclust.bench.WHAT; options after WHAT go to it (semclust bench ops --help).")
    b.add_argument("what", choices=("ops", "step", "scale", "method", "k"))
    b.add_argument("--json", help="write results as JSON")
    b.add_argument("--quick", action="store_true", help="small shapes, about a minute")
    b.add_argument("args", nargs=argparse.REMAINDER, help="options of the benchmark itself, e.g. --threads 1")
    b.set_defaults(fn=cmd_bench)

    x = sub.add_parser("build-ext", help="compile the C++ (and with --cuda, CUDA) extension ahead of time")
    x.add_argument("--cuda", action="store_true", help="also build the CUDA kernels (needs nvcc and a CUDA build of torch)")
    x.set_defaults(fn=cmd_build_ext)
    return p


def _error(e: BaseException, a: argparse.Namespace) -> Optional[tuple[int, str]]:
    """(exit code, one-line message) of an expected failure; None for a bug."""
    if isinstance(e, pickle.UnpicklingError):  # one no CLI helper could name (e.g. a --pretrained checkpoint)
        return 2, "a file is not a safe tensor file (torch.load(weights_only=True) refused to unpickle it)"
    if isinstance(e, OSError):
        if e.strerror and e.filename is not None:
            message = f"{e.strerror}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
        elif e.strerror:  # a write to an open file (disk full): name what the command was writing
            out = getattr(a, "out", None) or getattr(a, "json", None)
            message = e.strerror + (f" (while writing {out})" if out else "")
        else:
            message = _first_line(e, limit=1000)
        return (2 if isinstance(e, USER_ERRORS) else 1), message
    if isinstance(e, USER_ERRORS):
        return 2, _first_line(e, limit=1000)
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with warnings.catch_warnings():
            # torch's weights-only unpickler warns about a legacy pickle's protocol, then
            # refuses or loads it: either way the user's line is the error or the result
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        print("semclust: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        known = _error(e, args)
        if known is None or args.debug or args.verbose:  # -v kept its documented traceback (README)
            raise
        print(f"semclust {args.command}: error: {known[1]}", file=sys.stderr)
        return known[0]


if __name__ == "__main__":
    sys.exit(main())
