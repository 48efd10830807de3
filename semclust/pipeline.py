"""A fit, phase by phase: encode → nouns → semantic space → counterparts → neighbours →
stage 1 → stage 2 → cluster names, over one `Workspace`.

Each phase is one function that goes straight down to `method/`, `clip/` or `inputs/`
and back, and is timed as itself by `runtime.report.Phases` (its seconds and peak
memory in `FitResult.history["phases"]`). `fit` runs them in order and returns a
`FitResult`; the estimator (`api.SemanticClusterer`) turns that into its `*_` attributes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from . import ops
from .config import Config
from .inputs.classify import Inputs
from .inputs.sources import KeptSource, SkipReport, Source, TensorSource, iter_batches
from .inputs.store import EmbeddingStore
from .method import counterparts, k_search, neighbours, stage1, stage2
from .method.counterparts import SemanticSpace
from .model import AdapterModel, ClusterNames, EncoderModel, FittedModel, Stage1Model
from .runtime import rows
from .runtime.mmap import as_tensor, fingerprint, release, trim_heap
from .runtime.report import Phases
from .runtime.workspace import Workspace

log = logging.getLogger(__name__)

NAMES_PER_CLUSTER = 5


@runtime_checkable
class TextEncoder(Protocol):
    """An encoder that can embed words (a CLIP text tower): needed for word nouns."""

    def encode_texts(self, texts: Sequence[str], *args: Any, **kwargs: Any) -> Tensor: ...


@dataclass
class Encoded:
    u: Optional[Tensor]  # [n, D] unit rows on the device (None: a store, read in the workspace)
    kept: Tensor  # [n] source indices of the readable items
    n_total: int  # N, readable or not
    report: SkipReport


@dataclass
class FitResult:
    model: FittedModel
    stage1_labels: Tensor  # [n] over the kept rows
    labels: Tensor  # [n] final
    conf: Tensor  # [n]
    centers: Tensor  # [K, D]
    kept: Tensor  # [n] source indices
    n_total: int
    dim: int
    report: SkipReport
    history: dict[str, Any]
    names: ClusterNames  # [K] (name, score) pairs, best first


# ---- the phases ------------------------------------------------------------------------

@torch.no_grad()
def encode_source(encoder: Any, source: Source, batch_size: int, progress: bool) -> tuple[Tensor, Tensor, SkipReport]:
    """Features of every readable item on the plain view: (U [n, D] float32, kept [n], report)."""
    report = SkipReport()
    feats, kept_all = [], []
    for batch, kept, _ in iter_batches(source, encoder.view_transform("eval"), batch_size, report=report,
                                       progress=progress, desc="encode"):
        if batch is not None:
            feats.append(encoder.image_features(batch).float().cpu())
            kept_all.append(kept)
    if not feats:
        raise ValueError(f"none of the {len(source)} inputs could be read: {report}")
    if report.count:
        log.warning("%s", report)
    return torch.cat(feats), torch.cat(kept_all), report


def encode(inputs: Inputs, encoder: Callable[[], Any], k: int, cfg: Config, device: torch.device,
           progress: bool) -> Encoded:
    """Image features of the inputs (or, for a store, only its size), checked and unit-norm.

    Images given with their features (`Inputs` holding a source and a store or embeddings,
    as `semclust reproduce` passes a cached split) are not encoded again: the features
    are used, and the images, one per row, are read by stage 2 only.
    """
    if inputs.store is None and inputs.embeddings is None:
        u, kept, report = encode_source(encoder(), inputs.source, cfg.chunks.encode_batch_size, progress)
        n_total = len(inputs.source)
    elif inputs.store is not None:
        n_total, report, u = len(inputs.store), SkipReport(), None
        kept = torch.arange(n_total)
    else:
        u, n_total, report = inputs.embeddings, inputs.embeddings.shape[0], SkipReport()
        kept = torch.arange(n_total)
    if inputs.source is not None and len(inputs.source) != n_total:
        raise ValueError(f"the images ({len(inputs.source)}) and their features ({n_total} rows) differ in number")
    if u is not None:
        ops.validate.matrix("embeddings", u)
    if k > kept.numel():
        raise ValueError(f"n_clusters={k} is larger than the number of samples ({kept.numel()})")
    if u is not None:
        u = unit_features(u, cfg.chunks.assign).to(device)
    return Encoded(u, kept, n_total, report)


def unit_features(u: Tensor, chunk: int) -> Tensor:
    """[n, D] features as contiguous unit rows, the same whatever their scale or layout
    (checked `chunk` rows at a time).

    fp16 rows stay fp16 (half the memory; every op reads them chunk by chunk) and, when
    already unit-norm (a store's rows), exactly as given, in row-major order; a unit row
    times 2^16 (its norm overflows fp16) is not unit and is normalised like any other.
    """
    if u.dtype == torch.float16:
        # made row-major first, so that the unit check, like the rows, does not depend on the layout
        u = u.contiguous()
        return u if ops.validate.unit_rows(u, chunk) else ops.normalize_rows(u)
    return ops.normalize_rows(u, dtype=torch.float32)


def resolve_nouns(nouns: Any) -> Union[np.ndarray, Tensor, list[str]]:
    """A noun matrix [W, D] as given, or the words of a vocabulary spec ("default",
    "wordnet", a file, a list): read before any image is encoded, so that a missing or
    empty noun file fails before the CLIP model is loaded."""
    if isinstance(nouns, (np.ndarray, Tensor)):
        return nouns
    from .clip.vocab import load_nouns

    return load_nouns(nouns)


def noun_bank(nouns: Any, dim: int, encoder: Callable[[], Any], progress: bool) -> Tensor:
    """[W, D] unit noun embeddings: given as a matrix, or words (`resolve_nouns`) embedded
    by the CLIP text tower."""
    if isinstance(nouns, (np.ndarray, Tensor)):
        t = torch.as_tensor(nouns).float()
        ops.validate.matrix("nouns", t, cols=dim)
        return ops.normalize_rows(t)
    enc = encoder()
    if not isinstance(enc, TextEncoder):
        raise TypeError("word nouns need a CLIP text tower: pass noun embeddings [W, D] with a custom encoder")
    from .clip.vocab import embed_nouns

    t = embed_nouns(enc, nouns, progress=progress)
    if t.shape[1] != dim:
        raise ValueError(f"noun embeddings have dim {t.shape[1]} but image features have {dim}")
    return t


def run_id(inputs: Inputs, u: Optional[Tensor], bank: Tensor, k: Any, seed: int, cfg: Config,
           device: Union[str, torch.device] = "cpu") -> str:
    """What a workspace must match to be reused: the data, the nouns, K, the seed and
    the settings of the phases it caches (the kNN search as `neighbours.resolve_method`
    resolves it on `device`: an "auto" run resumes the lists of the search it made)."""
    data = inputs.store.fingerprint() if inputs.store is not None else fingerprint(u)
    d = cfg.to_dict()
    knn = {f: d["neighbours"][f] for f in ("k", "nlist", "nprobe")}
    n = len(inputs.store) if u is None else u.shape[0]
    knn["method"] = neighbours.resolve_method(n, device, cfg.neighbours)
    settings = {"k": k, "seed": seed, "semantic": d["semantic"], "counterparts": d["counterparts"], "knn": knn,
                "data": data, "nouns": fingerprint(bank)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def store_rows(store: EmbeddingStore, ws: Workspace, cfg: Config, progress: bool) -> Tensor:
    """The store's rows as one [N, D] fp16 tensor without reading them into memory: the
    one shard itself, or the shards copied into one memory-mapped workspace file."""
    if store.shard_count == 1:
        return as_tensor(store.shard(0))
    shards = [store.shard(i) for i in range(store.shard_count)]
    return rows.fill(ws, "images", (len(store), store.dim), torch.float16,
                     lambda lo, hi: torch.from_numpy(store.rows(lo, hi)), chunk=cfg.chunks.assign, reads=shards,
                     desc="store rows", progress=progress)


def semantic_space(u: Tensor, bank: Tensor, k: int, cfg: Config, seed: int, progress: bool) -> SemanticSpace:
    space = counterparts.select_nouns(u, bank, k, cfg.semantic, seed=seed, chunks=cfg.chunks, progress=progress)
    release(u)
    return space


def neighbour_lists(u: Tensor, v: Tensor, ws: Workspace, cfg: Config, seed: int,
                    progress: bool) -> tuple[dict[str, Tensor], Optional[dict[str, float]]]:
    """Both kNN lists [n, m] (m = min(neighbours.k, n - 1)) and, for an approximate
    search with a recall sample, their recall@m against exact search."""
    n, nc = u.shape[0], cfg.neighbours
    m = min(nc.k, n - 1)
    spaces = {"knn_image": u, "knn_text": v}
    # the IVF index trains on a sample drawn with seed 0 whatever the fit's seed (as before
    # the re-layout), so a run's kNN files do not depend on it
    lists = {name: neighbours.knn_lists(z, m, cfg.chunks, nc, seed=0, ws=ws, name=name, progress=progress)
             for name, z in spaces.items()}
    method = neighbours.resolve_method(n, u.device, nc, warn=True)
    log.info("kNN: %s search over %d rows (neighbours.method = %s)", method, n, nc.method)
    if method == "ivf":
        trim_heap()  # the IVF indexes are gone, their memory is not: 2.2 GB at 1M rows
    recall = None
    if method != "exact" and nc.recall_sample:
        recall = {}
        for name, z in spaces.items():
            recall[name] = neighbours.recall_at_k(z, lists[name], m, nc.recall_sample, seed=seed,
                                                  database_chunk=cfg.chunks.knn_database)
            # its exact side read every row: at 1M x 512 fp16 both maps held 2.3 GB resident
            release(z)
        log.info("approximate kNN recall@%d: %s", m, recall)
    release(u, v)
    return lists, recall


def noun_labels(nouns: Union[np.ndarray, Tensor, list[str]], index: Tensor) -> list[str]:
    """The names of vocabulary rows `index`: the words, or "noun <row>" for noun
    embeddings given as a matrix (nothing else names them)."""
    rows = index.tolist()
    if isinstance(nouns, list):
        return [nouns[i] for i in rows]
    return [f"noun {i}" for i in rows]


@torch.no_grad()
def name_clusters(v: Tensor, labels: Tensor, bank: Tensor, names: list[str], k: int,
                  top: int = NAMES_PER_CLUSTER) -> ClusterNames:
    """Per cluster its `top` nouns of the bank [W', D] (`names` [W']) nearest to the
    cluster's text-side centre, normalise(mean of its members' counterparts v [n, D]),
    with their cosines; an empty cluster gets none.

    Chosen over the text head's probabilities on the nouns, which names clusters as well
    (share of clusters whose first name is a noun of its Hungarian-matched class, stage 2,
    5 seeds: "gap" 1.000 both, "k100" 0.940 both), because it follows the final labels
    (the text head is stage 1's) and gives an empty cluster no names.
    """
    # the op reads v (perhaps a memory-mapped [N, D] fp16 workspace array) in row chunks
    centres, counts = ops.center_update(v, k, labels=labels.to(v.device))
    release(v)
    scores = centres.float().to(bank.device) @ bank.float().T  # [K, W'] cosines
    best, idx = scores.topk(min(top, bank.shape[0]), dim=1)
    return [[] if counts[c] == 0 else [(names[j], round(s, 4)) for s, j in zip(best[c].tolist(), idx[c].tolist(), strict=True)]
            for c in range(k)]


# ---- the fit ---------------------------------------------------------------------------

def fit(inputs: Inputs, *, k: Optional[int], stage: int, cfg: Config, seed: int, device: torch.device,
        encoder: Callable[[], Any], nouns: Any, work_dir: Optional[Path], resume: bool, progress: bool,
        keep_all_encoder_weights: bool, k_range: tuple[int, int] = (2, 200)) -> FitResult:
    """Every phase of a fit, in order (see the module doc). `encoder()` gives the CLIP
    encoder (loaded on first call), needed for images and for word nouns. k=None: K is
    estimated within `k_range` (phase "k_search") after the rows are in place."""
    phases = Phases()
    # which backend each op runs on: an extension not built for these sources is skipped
    # by the automatic choice, which a log of timings should show
    log.info("op backends on %s: %s", torch.device(device).type,
             ", ".join(f"{op}={b}" for op, b in ops.resolved_backends(device).items()))
    nouns = resolve_nouns(nouns)
    with phases("encode"):
        enc = encode(inputs, encoder, k if k is not None else k_range[0], cfg, device, progress)
    u = enc.u
    with phases("nouns"):
        bank_all = noun_bank(nouns, inputs.store.dim if u is None else u.shape[1], encoder, progress)
    # an estimated K is part of the run: the search is deterministic for the data and seed
    searched = k is None
    key = {"auto": list(k_range)} if searched else k
    # closed when the fit ends or fails: its lock keeps a second run out of work_dir until then;
    # in memory nothing is resumed, so the data is not hashed for a run id
    run = run_id(inputs, u, bank_all, key, seed, cfg, device) if work_dir is not None else ""
    with Workspace(work_dir, run, fresh=not resume) as ws:
        if u is None:
            with phases("store"):
                u = store_rows(inputs.store, ws, cfg, progress).to(device)
        n, d = u.shape
        bank_all = bank_all.to(device)
        if searched:
            with phases("k_search"):
                search = k_search.estimate_k(u, bank_all, k_range, cfg, seed)
            k = search.k
            log.info("estimated K = %d within %s:\n%s", k, tuple(k_range), search.table())
        with phases("kmeans"):
            space = semantic_space(u, bank_all, k, cfg, seed, progress)
            bank = space.bank(bank_all)
        with phases("counterparts"):
            v = counterparts.text_counterparts(u, bank, cfg.counterparts, cfg.chunks, ws=ws,
                                               progress=progress).to(device)
        with phases("knn"):
            lists, recall = neighbour_lists(u, v, ws, cfg, seed, progress)
        with phases("stage1"):
            r1 = stage1.train_stage1(u, v, k, lists["knn_image"], lists["knn_text"], cfg.stage1, seed=seed,
                                     chunks=cfg.chunks, progress=progress, checkpoint=ws.path("stage1.ckpt"),
                                     resume=resume, data_key=ws.run)
        model: FittedModel = Stage1Model(r1.heads, bank, cfg)
        labels, conf, history2 = r1.labels, r1.conf, []
        if stage == 2:
            with phases("stage2"):
                model, r2 = _stage2(inputs, enc.kept, u, bank, r1, k, cfg, seed, device, encoder, ws, resume, progress,
                                    keep_all_encoder_weights)
            labels, conf, centers, history2 = r2.labels.to(device), r2.conf.to(device), r2.centers, r2.history
        else:
            centers, _ = ops.center_update(u, k, labels=labels.to(u.device))
            release(u)  # read every row
        with phases("names"):
            names = name_clusters(v, labels, bank, noun_labels(nouns, space.noun_index), k)
        history = {
            "stage1": r1.history, "stage2": history2, "seconds": phases.seconds, "phases": phases.rows,
            "kmeans_objective": space.kmeans_objective, "nouns_total": int(bank_all.shape[0]),
            "nouns_selected": int(bank.shape[0]), "skipped": enc.report.count, "knn_recall": recall,
            "k_search": search.to_dict() if searched else None,
        }
        log.info("fit phases:\n%s", phases.table())
        return FitResult(model, r1.labels, labels, conf, centers, enc.kept, enc.n_total, d, enc.report, history, names)


def _stage2(inputs: Inputs, kept: Tensor, u: Tensor, bank: Tensor, r1: stage1.Stage1Result, k: int, cfg: Config, seed: int,
            device: torch.device, encoder: Callable[[], Any], ws: Workspace, resume: bool, progress: bool,
            keep_all: bool) -> tuple[FittedModel, stage2.Stage2Result]:
    """Self-enhancement: fine-tune a copy of the encoder (images) or a residual adapter
    (embeddings only) with a copy of the stage-1 image head."""
    if inputs.source is not None:
        # tune a copy: the user's encoder object and the cached pristine CLIP stay as
        # they were, so a second fit starts from the same weights as the first
        tunable = copy.deepcopy(encoder())
        source, mode = KeptSource(inputs.source, kept), "encoder"
    else:
        tunable = stage2.FeatureAdapter(u.shape[1], cfg.stage2).to(device)
        source, mode = TensorSource(u.cpu()), "adapter"
    head = copy.deepcopy(r1.heads.image)
    r2 = stage2.train_stage2(tunable, source, head, r1.labels, r1.conf, k, cfg.stage2, mode=mode, seed=seed,
                             progress=progress, checkpoint=ws.path("stage2.ckpt"), resume=resume)
    if mode == "adapter":
        return AdapterModel(r1.heads, bank, cfg, head=r2.head, adapter=tunable), r2
    module = getattr(tunable, "model", tunable)
    keys = [name for name, p in module.named_parameters() if p.requires_grad]
    return EncoderModel(r1.heads, bank, cfg, head=r2.head, encoder=tunable, tuned_keys=keys, keep_all=keep_all), r2
