"""`semclust reproduce`: the paper's benchmarks, every method beside TAC's published numbers.

TAC's protocol (Li et al., "Image Clustering with External Guidance", ICML 2024, and its
code, XLearning-SCU/2024-ICML-TAC), which the published numbers follow: the nouns are
selected on the **train** split, every trained model (TAC's heads, stages 1 and 2) is
trained on the train split, and ACC / NMI / ARI (`semclust.metrics.evaluate`) are scored
on the **test** split (ImageNet-1K: val). The two methods that learn nothing but the
nouns, k-means and training-free TAC, cluster the test split itself, as TAC's
``concat_kmeans.py`` does. A layout without split folders (DTD's images/ without its
labels/, class folders only) is both splits at once, and is encoded once.

K is the number of classes in the train split: 10, 20, 10, 10, 15, 47, 101 and 1000 on
complete copies of CIFAR-10, CIFAR-20, STL-10, ImageNet-10, ImageNet-Dogs, DTD, UCF-101
and ImageNet-1K (a partial copy is said so in `Reproduction.notes`).

Images: each dataset gets the resize and centre crop TAC's ``data_utils.py`` gives it,
then the model's normalisation (bicubic, CLIP's mean / std; sizes below for ViT-B/32's
224 input):

    CIFAR-10, CIFAR-20   32 x 32       shorter side to 224, centre crop 224: upsampled,
    STL-10               96 x 96       square, nothing cut (CLIP's own preprocessing)
    DTD                  300-640 px    shorter side to 224, centre crop 224 (CLIP's own)
    UCF-101 frames       320 x 240     shorter side to 224 (299 x 224), centre crop 224
    ImageNet-10 / -Dogs  ImageNet      shorter side to 256, centre crop 224: the standard
    ImageNet-1K          JPEGs         ImageNet evaluation view (a 1/8 border cut)

Why: the published numbers were measured on exactly these inputs, and CLIP's weights
expect the model's input size (a per-dataset size, CIFAR at 32 px say, would give
ViT-B/32 a patch grid its positional embedding never saw). The ImageNet view is applied
to the images before the model's own preprocessing (`Benchmark.resize_ratio`), so the
stores, stage 2's views and the tuned encoder's test pass all see the same crop.

Methods (each row of the table):

    k-means              spherical k-means on the test split's image embeddings
                         (`ops.kmeans`)
    TAC, training-free   k-means on the test split's [u || v] (`method.tac.tac_training_free`),
                         v its counterparts over the nouns TAC selects on the train split
    TAC heads            a stage-1 fit on the train split with TAC's whole recipe
                         (`Config.tac()`: TAC's nouns and counterparts, `method.tac.fit_tac_heads`
                         with TAC's settings for K); test images through its image head
    stage 1              semclust's stage 1 (`pipeline.fit` with the given config) on the
                         train split, test images through its heads
    stage 2              the same fit's stage 2: the CLIP vision encoder's last blocks
                         fine-tuned on the train images; test images encoded by the tuned
                         encoder (not run with stage=1: its row holds None)

Files under `out`: ``embeddings/train`` and ``embeddings/test``, embedding stores
(`inputs.store`, written by `ClipEncoder.embed_to_store` as `semclust embed` writes
them), so a rerun encodes nothing it has encoded before; ``fit/``, the fit's working
directory (with `resume`, a killed run continues there). Both fits read the train split
from its store, as `semclust fit --store` does; only the scored test split is held in
memory, and labels are computed a chunk of rows at a time.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms as T

from . import ops, pipeline
from .clip.encoder import ClipEncoder
from .config import Config
from .inputs.benchmarks import load_benchmark
from .inputs.classify import Inputs
from .inputs.sources import ImageSource, KeptSource
from .inputs.store import EmbeddingStore, is_store, open_store
from .method import counterparts, tac
from .metrics import evaluate
from .model import FittedModel, Stage1Model

PathLike = Union[str, os.PathLike]
FORMAT = "semclust-reproduce/1"
PUBLISHED_BY = "TAC (Li et al., ICML 2024), ViT-B/32"
METHODS = ("k-means", "TAC, training-free", "TAC heads", "stage 1", "stage 2")
PUBLISHED_ROW = "TAC heads"  # the method the published numbers are of
METRICS = ("acc", "nmi", "ari")


class Benchmark(NamedTuple):
    title: str
    classes: int  # of a complete copy
    published: tuple[Optional[float], Optional[float], Optional[float]]  # TAC's ACC, NMI, ARI in percent
    resize_ratio: float = 1.0  # shorter side / crop before the centre crop (1: CLIP's own preprocessing)


IMAGENET_VIEW = 256 / 224  # TAC's Resize(256) + CenterCrop(224) of the ImageNet-derived sets

BENCHMARKS: dict[str, Benchmark] = {
    "cifar10": Benchmark("CIFAR-10", 10, (91.9, 83.3, 83.1)),
    "cifar20": Benchmark("CIFAR-20", 20, (60.7, 61.1, 44.8)),
    "stl10": Benchmark("STL-10", 10, (98.2, None, None)),
    "imagenet10": Benchmark("ImageNet-10", 10, (99.2, 98.5, 98.3), IMAGENET_VIEW),
    "imagenet-dogs": Benchmark("ImageNet-Dogs", 15, (None, None, None), IMAGENET_VIEW),
    "dtd": Benchmark("DTD", 47, (50.1, 62.1, 34.4)),
    "ucf101": Benchmark("UCF-101", 101, (None, None, None)),
    "imagenet1k": Benchmark("ImageNet-1K", 1000, (58.2, None, None), IMAGENET_VIEW),
}


class CroppedSource(Dataset):
    """A source seen through a resize of the shorter side to `resize` and a centre crop
    to `crop` before whatever transform its consumer sets (the model's preprocessing,
    stage 2's views): a dataset's own view, for every pass over its images."""

    def __init__(self, source: ImageSource, resize: int, crop: tuple[int, int], interpolation: str) -> None:
        self.source, self.items = source, source.items
        mode = T.InterpolationMode.BICUBIC if interpolation == "bicubic" else T.InterpolationMode.BILINEAR
        self._view = T.Compose([T.Resize(resize, interpolation=mode), T.CenterCrop(crop)])
        self.transform = None

    @property
    def transform(self) -> Any:
        return self._transform

    @transform.setter
    def transform(self, fn: Any) -> None:
        self._transform = fn
        self.source.transform = self._view if fn is None else T.Compose([self._view, fn])

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[Any, int, Optional[str]]:
        return self.source[i]


@dataclass
class Split:
    """One split as encoded: the readable images, their labels and their store."""

    images: Dataset  # the readable images (a Source), one per store row
    labels: np.ndarray  # [n] int64 class ids
    store: EmbeddingStore
    encoded: bool  # whether this run encoded it (False: the store was already complete)
    unreadable: int  # images of the split left out


@dataclass
class Reproduction:
    """What `reproduce` measured: one row per method of `METHODS`.

    rows: {"method", "acc", "nmi", "ari" (percent, None where not run), "seconds" (None
    where not run), "published": {"acc", "nmi", "ari"} (percent or None) or None};
    splits: "train" and "test", each {"images" (readable, scored), "unreadable", "store"
    (its path), "encoded_now"}, the test split also "same_as_train"; preprocess:
    {"resize" (shorter side), "crop" [H, W], "interpolation", "mean", "std"}.
    """

    dataset: str
    title: str
    k: int
    clip: str
    pretrained: Optional[str]
    preprocess: dict[str, Any]
    splits: dict[str, dict[str, Any]]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (`FORMAT`): the run's settings, the splits, the rows."""
        return {"format": FORMAT, "dataset": self.dataset, "title": self.title, "k": self.k, "clip": self.clip,
                "pretrained": self.pretrained, "preprocess": self.preprocess, "splits": self.splits,
                "scores": "percent, on the test split", "published_by": PUBLISHED_BY, "rows": self.rows,
                "notes": self.notes}


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _split(name: str, source: Dataset, labels: np.ndarray, encoder: ClipEncoder, path: Path, batch_size: int,
           workers: int, progress: bool) -> Split:
    """Encode `source` (labels [N]) into the store at `path` (nothing to do when it is
    complete) and match the store's rows to the source's images."""
    cached = is_store(path) and open_store(path, verify=False, allow_incomplete=True).complete
    store = encoder.embed_to_store(source, path, batch_size=batch_size, num_workers=workers, progress=progress).store
    index = {item: i for i, item in enumerate(source.items)}
    kept = [index.get(item, -1) for item in store.items]
    if -1 in kept or store.meta["source_consumed"] != len(source):
        raise ValueError(f"the store at {path} was written from other images than the {name} split's "
                         f"{len(source)}; delete it or choose another --out")
    kept_t = torch.tensor(kept, dtype=torch.long)
    images = source if len(kept) == len(source) else KeptSource(source, kept_t)
    return Split(images, labels[kept_t.numpy()], store, not cached, len(source) - len(kept))


def _scores(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """ACC, NMI and ARI of predictions [M] against classes y [M], in percent."""
    return {m: 100.0 * v for m, v in evaluate(y, pred).items() if m in METRICS}


def _labels(model: FittedModel, u: Tensor, chunk: int) -> np.ndarray:
    """[M] most probable cluster of each unit row of u [M, D] under a fitted model, `chunk`
    rows at a time (the [M, K] probabilities never exist at once)."""
    return torch.cat([model.proba(u[s : s + chunk]).argmax(1).cpu() for s in range(0, u.shape[0], chunk)]).numpy()


def reproduce(dataset: str, root: PathLike, out: PathLike, *, pretrained: Optional[PathLike],
              clip: PathLike = "ViT-B-32", config: Optional[Config] = None, nouns: Any = "default", stage: int = 2,
              seed: int = 0, device: Optional[str] = None, batch_size: int = 256, workers: int = 0,
              resume: bool = False, progress: bool = False) -> Reproduction:
    """Run every method of `METHODS` on `dataset` by TAC's protocol (see the module doc).

    Args:
        dataset: a key of `BENCHMARKS`; read by `inputs.benchmarks.load_benchmark` from `root`.
        out: folder of the embedding stores and the fit's working files (created).
        pretrained, clip: the CLIP model, as `ClipEncoder.load` takes them (a local
            checkpoint file; an open_clip tag fails within seconds where it cannot be fetched).
        config: the semclust fit's settings (k-means uses its `semantic` iterations and
            restarts); TAC's rows use `Config.tac()`.
        nouns: the vocabulary, as `SemanticClusterer` takes it (words or [W, D] embeddings).
        stage: 2 runs every row; 1 leaves out stage 2 (its row holds None).
        device: where everything runs (default: cuda when available).
        batch_size, workers: of the encoding (`ClipEncoder.embed_to_store`).
        resume: continue the fit of a killed run in `out`/fit.
    Returns:
        A `Reproduction`: scores in percent on the test split, seconds per method.
    Raises:
        FileNotFoundError: the dataset or the checkpoint is missing (the message gives the
            dataset's layout and where to get it).
    """
    if dataset not in BENCHMARKS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {list(BENCHMARKS)}")
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    bench = BENCHMARKS[dataset]
    cfg = config or Config()
    out = Path(out)
    # the data first: a missing dataset is said before any weights are read
    train_src = load_benchmark(dataset, root, "train")
    test_src = load_benchmark(dataset, root, "test")
    encoder = ClipEncoder.load(clip, pretrained, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pc = encoder.preprocess_cfg
    resize = round(min(encoder.image_size) * bench.resize_ratio)

    def split(name: str, source: ImageSource) -> Split:
        view = source if bench.resize_ratio == 1.0 else CroppedSource(source, resize, encoder.image_size,
                                                                       pc.interpolation)
        return _split(name, view, source.labels, encoder, out / "embeddings" / name, batch_size, workers, progress)

    train = split("train", train_src)
    # a layout without split folders is one set: both splits are the same images
    same = test_src.items == train_src.items
    test = train if same else split("test", test_src)
    k = int(np.unique(train.labels).size)
    if len(test.labels) < k:
        raise ValueError(f"the test split has {len(test.labels)} readable images, fewer than the {k} classes")
    notes = [f"{bench.title} has no split folders here: the test split is the train split"] if same else []
    if k != bench.classes:
        notes.append(f"the train split has {k} classes (a complete {bench.title} has {bench.classes}): K = {k}")
    splits = {"train": train, "test": test}
    notes += [f"{s.unreadable} unreadable images of the {name} split left out"
              for name, s in splits.items() if s.unreadable and not (same and name == "test")]

    device = encoder.device
    # the scored split in memory (k-means and every method's labels run on it); the train
    # split stays in its store, which both fits read in chunks (ImageNet-1K's train split
    # would be 2.6 GB of float32 rows)
    u_test = test.store.to_tensor().to(device)
    bank = pipeline.noun_bank(pipeline.resolve_nouns(nouns), test.store.dim, lambda: encoder, progress)
    chunk = cfg.chunks.assign
    common = dict(k=k, seed=seed, device=device, encoder=lambda: encoder, nouns=bank, progress=progress,
                  keep_all_encoder_weights=False)
    scores: dict[str, tuple[Optional[dict[str, float]], Optional[float]]] = {}

    km, seconds = _timed(lambda: ops.kmeans(u_test, k, iters=cfg.semantic.kmeans_iters,
                                            restarts=cfg.semantic.kmeans_restarts, seed=seed))
    scores["k-means"] = _scores(test.labels, km.labels.cpu().numpy()), seconds

    tac_cfg = Config.tac()
    r_tac, seconds = _timed(lambda: pipeline.fit(Inputs(None, None, train.store), stage=1, cfg=tac_cfg,
                                                 work_dir=None, resume=False, **common))
    scores["TAC heads"] = _scores(test.labels, _labels(r_tac.model, u_test, chunk)), seconds

    def training_free() -> np.ndarray:
        # the test split's counterparts over the nouns the train split selected
        v_test = counterparts.text_counterparts(u_test, r_tac.model.noun_bank, tac_cfg.counterparts, tac_cfg.chunks)
        return tac.tac_training_free(u_test, v_test, k, seed=seed)

    pred, seconds = _timed(training_free)
    scores["TAC, training-free"] = _scores(test.labels, pred), seconds

    # the train images beside their stored rows: nothing is encoded again, stage 2 reads them
    r = pipeline.fit(Inputs(None, train.images, train.store), stage=stage, cfg=cfg, work_dir=out / "fit",
                     resume=resume, **common)
    phase_s = r.history["seconds"]
    # the heads stage 2 started from, on the pristine features
    stage1 = Stage1Model(r.model.heads, r.model.noun_bank, cfg)
    scores["stage 1"] = (_scores(test.labels, _labels(stage1, u_test, chunk)),
                         sum(s for name, s in phase_s.items() if name not in ("stage2", "names")))
    scores["stage 2"] = None, None
    if stage == 2:
        def stage2_scores() -> dict[str, float]:
            tuned = r.model.image_encoder(encoder)
            feats, kept, _ = pipeline.encode_source(tuned, test.images, cfg.chunks.encode_batch_size, progress)
            return _scores(test.labels[kept.numpy()], _labels(r.model, feats.to(device), chunk))

        got, seconds = _timed(stage2_scores)
        scores["stage 2"] = got, phase_s["stage2"] + seconds

    rows = []
    for method in METHODS:
        got, seconds = scores[method]
        published = dict(zip(METRICS, bench.published, strict=True)) if method == PUBLISHED_ROW else None
        rows.append({"method": method, **{m: None if got is None else got[m] for m in METRICS},
                     "seconds": seconds, "published": published})
    preprocess = {"resize": resize, "crop": list(encoder.image_size), "interpolation": pc.interpolation,
                  "mean": list(pc.mean), "std": list(pc.std)}
    split_info = {name: {"images": len(s.labels), "unreadable": s.unreadable, "store": str(s.store.path),
                         "encoded_now": s.encoded and not (same and name == "test")} for name, s in splits.items()}
    split_info["test"]["same_as_train"] = same
    return Reproduction(dataset, bench.title, k, encoder.name, encoder.pretrained, preprocess, split_info, rows,
                        notes)
