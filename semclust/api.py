"""`SemanticClusterer`: the whole method behind scikit-learn conventions.

>>> model = SemanticClusterer(n_clusters=10, clip="ViT-B-32", pretrained="/path/ckpt.pt")
>>> labels = model.fit_predict("images/")           # folder, list of paths, or a Dataset
>>> labels = model.fit_predict(U, nouns=T)          # CLIP embeddings [N, D] and nouns [W, D]
"""

from __future__ import annotations

import copy
import hashlib
import json
import numbers
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import ops
from .config import Config
from .inputs.classify import InputLike, Inputs, as_inputs
from .inputs.sources import KeptSource, SkipReport, TensorSource, collate_skip
from .inputs.store import EmbeddingStore
from .method import counterparts, neighbours, stage1, stage2
from .method.heads import ClusterHead, Heads
from .runtime.distributed import is_distributed
from .runtime.files import atomic_save_tensors, atomic_write, sha256_file
from .runtime.mmap import as_tensor, fingerprint, release
from .runtime.report import Phases
from .runtime.workspace import Workspace

log = logging.getLogger(__name__)

MODEL_FORMAT = "semclust-model/1"
CONFIG_FILE = "semclust.json"
WEIGHTS_FILE = "weights.safetensors"


@torch.no_grad()
def _encode(encoder: Any, source: Dataset, batch_size: int, progress: bool) -> tuple[Tensor, Tensor, SkipReport]:
    """Features of every readable item on the plain view: (U [n, D] float32, kept [n], report)."""
    source.transform = encoder.view_transform("eval")
    report = SkipReport()
    feats, kept_all = [], []
    loader = DataLoader(source, batch_size=batch_size, shuffle=False, collate_fn=collate_skip)
    for batch, kept, skipped in tqdm(loader, desc="encode", unit="batch", disable=not progress, leave=False):
        report.update(source.items, kept, skipped)
        if batch is not None:
            feats.append(encoder.image_features(batch).float().cpu())
            kept_all.append(kept)
    if not feats:
        raise ValueError(f"none of the {len(source)} inputs could be read: {report}")
    if report.count:
        log.warning("%s", report)
    return torch.cat(feats), torch.cat(kept_all), report


class SemanticClusterer:
    """Cluster images (or their CLIP features) into `n_clusters` groups, no labels needed.

    Stage 1 trains image and text clustering heads on frozen CLIP features with
    cross-modal semantic consistency; stage 2 (``stage=2``) fine-tunes the encoder's last
    blocks (images) or a residual adapter (embeddings only) on confident pseudo-labels.

    Parameters are stored verbatim; `fit` does the work. Learned attributes:
    ``labels_`` [N] (-1 for unreadable images), ``confidences_`` [N],
    ``cluster_centers_`` [K, D], ``history_`` (per-phase metrics and timings),
    ``stage1_labels_`` [N], ``skipped_`` (unreadable inputs), ``mode_``.

    Args:
        n_clusters: K >= 2.
        clip: an open_clip model name, a model-config .json, or an encoder object with
            ``image_features``, ``tail_parameters`` and ``view_transform`` (see stage2).
        pretrained: open_clip pretrained tag or local checkpoint file (None: random, tests).
        nouns: noun vocabulary: "default", "wordnet", a text file, a list of words, or
            noun embeddings [W, D]; `fit(..., nouns=...)` overrides it.
        stage: 1 (heads only) or 2 (plus self-enhancement).
        config: a `semclust.config.Config` (defaults from DESIGN.md).
        device: "cpu", "cuda", ... (default: cuda when available).
        checkpoint_dir: the fit's working directory: per-row intermediates (memory-mapped
            .npy: text counterparts, kNN lists, consolidated store rows) and the stage-1 /
            stage-2 training state after every epoch (`stage1.ckpt`, `stage2.ckpt`), all
            written atomically; with `resume=True` a killed fit reuses the finished
            phases and continues training from the last checkpoint.
    """

    def __init__(
        self,
        n_clusters: int = 10,
        clip: Any = "ViT-B-32",
        pretrained: Optional[str] = "openai",
        nouns: Any = "default",
        stage: int = 2,
        config: Optional[Config] = None,
        device: Optional[str] = None,
        seed: int = 0,
        progress: bool = False,
        checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
        resume: bool = False,
    ) -> None:
        self.n_clusters = n_clusters
        self.clip = clip
        self.pretrained = pretrained
        self.nouns = nouns
        self.stage = stage
        self.config = config
        self.device = device
        self.seed = seed
        self.progress = progress
        self.checkpoint_dir = checkpoint_dir
        self.resume = resume

    # ---- fitting -----------------------------------------------------------------------

    def _check_params(self) -> None:
        k = self.n_clusters
        if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 2:
            raise ValueError(f"n_clusters must be an int >= 2, got {k!r}")
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage!r}")

    def _device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def _encoder(self) -> Any:
        if not isinstance(self.clip, (str, os.PathLike)):
            return self.clip
        if getattr(self, "_clip_encoder", None) is None:
            from .clip.encoder import ClipEncoder

            self._clip_encoder = ClipEncoder.load(self.clip, self.pretrained, device=self._device())
        return self._clip_encoder

    def _noun_bank(self, nouns: Any, dim: int) -> Tensor:
        if isinstance(nouns, (np.ndarray, Tensor)):
            t = torch.as_tensor(nouns).float()
            ops.validate.matrix("nouns", t, cols=dim)
            return torch.nn.functional.normalize(t, dim=1)
        encoder = self._encoder()
        if not hasattr(encoder, "encode_texts"):
            raise TypeError("word nouns need a CLIP text tower: pass noun embeddings [W, D] with a custom encoder")
        from .clip.vocab import embed_nouns, load_nouns

        t = embed_nouns(encoder, load_nouns(nouns), progress=self.progress)
        if t.shape[1] != dim:
            raise ValueError(f"noun embeddings have dim {t.shape[1]} but image features have {dim}")
        return t

    def fit(self, X: InputLike, y: Any = None, nouns: Any = None) -> "SemanticClusterer":
        """Fit on images or embeddings (see the class doc); `y` is ignored (sklearn API).

        An embedding store is read memory-mapped and every per-row intermediate (text
        counterparts, kNN lists) lives in a workspace on disk (`checkpoint_dir`, else a
        temporary directory beside the store), so peak memory follows `config.chunks`,
        not N; with `resume=True` finished phases are reused.
        """
        self._check_params()
        inputs = as_inputs(X)
        if is_distributed() and inputs.source is not None:
            raise ValueError("a distributed fit reads embeddings: run `semclust embed` first and fit the store")
        if inputs.store is not None and self.checkpoint_dir is None:
            with tempfile.TemporaryDirectory(prefix=".semclust-fit-", dir=inputs.store.path.parent) as tmp:
                return self._fit(inputs, nouns, Path(tmp))
        return self._fit(inputs, nouns, None if self.checkpoint_dir is None else Path(self.checkpoint_dir))

    def _fit(self, inputs: Inputs, nouns: Any, work_dir: Optional[Path]) -> "SemanticClusterer":
        cfg = self.config or Config()
        device = self._device()
        k = int(self.n_clusters)
        phases = Phases()
        encoder = None
        with phases("encode"):
            if inputs.source is not None:
                encoder = self._encoder()
                u, kept, report = _encode(encoder, inputs.source, cfg.chunks.encode_batch, self.progress)
                n_total = len(inputs.source)
            elif inputs.store is not None:
                n_total, report = len(inputs.store), SkipReport()
                kept = torch.arange(n_total)
                u = None
            else:
                u, n_total, report = inputs.embeddings, inputs.embeddings.shape[0], SkipReport()
                kept = torch.arange(n_total)
            if u is not None:
                ops.validate.matrix("embeddings", u)
            n = kept.numel()
            if k > n:
                raise ValueError(f"n_clusters={k} is larger than the number of samples ({n})")
            if u is not None:
                # fp16 rows stay fp16 (half the memory; every op reads them chunk by chunk) and,
                # when already unit-norm (a store's rows), exactly as given
                if u.dtype != torch.float16 or not ops.validate.unit_rows(u, cfg.chunks.assign):
                    u = torch.nn.functional.normalize(u if u.dtype == torch.float16 else u.float(), dim=1)
                u = u.to(device)
            bank_all = self._noun_bank(self.nouns if nouns is None else nouns, inputs.store.dim if u is None else u.shape[1])
            ws = Workspace(work_dir, self._run_id(inputs, u, bank_all, cfg), fresh=not self.resume)
            if u is None:
                u = self._store_rows(inputs.store, ws, cfg).to(device)
        d = u.shape[1]
        bank_all = bank_all.to(device)

        with phases("kmeans"):
            space = counterparts.select_nouns(u, bank_all, k, cfg.semantic, seed=self.seed, chunks=cfg.chunks,
                                              progress=self.progress)
            bank = space.bank(bank_all)
            release(u)
        with phases("counterparts"):
            v = ws.get("counterparts")
            if v is None:
                v = ws.fill("counterparts", (n, d), u.dtype, lambda out, lo, hi: counterparts.text_counterparts(
                    u, bank, cfg.counterparts, cfg.chunks, out=out, progress=self.progress, rows=(lo, hi)))
            v = v.to(device)
        kk = min(cfg.stage1.knn_k, n - 1)
        lists = {}
        with phases("knn"):
            for name, z in (("knn_image", u), ("knn_text", v)):
                got = ws.get(name)
                if got is None:
                    got = ws.fill(name, (n, kk), torch.int32, lambda out, lo, hi, z=z, name=name: neighbours.neighbours(
                        z, kk, cfg.chunks, out=out, progress=self.progress, desc=name.replace("_", " "), cfg=cfg.stage1,
                        rows=(lo, hi)))
                lists[name] = got
            if cfg.stage1.knn_method != "exact" and cfg.stage1.knn_recall_sample:
                recall = {name: neighbours.recall_at_k(z, lists[name], kk, cfg.stage1.knn_recall_sample, seed=self.seed,
                                                database_chunk=cfg.chunks.knn_database)
                          for name, z in (("knn_image", u), ("knn_text", v))}
                log.info("approximate kNN recall@%d: %s", kk, recall)
        release(u, v)
        with phases("stage1"):
            ckpt = ws.path("stage1.ckpt")
            r1 = stage1.train_stage1(u, v, k, cfg.stage1, seed=self.seed, chunks=cfg.chunks, progress=self.progress,
                                     image_neighbours=lists["knn_image"], text_neighbours=lists["knn_text"],
                                     checkpoint=ckpt, resume=self.resume)
        self.heads_, self.noun_bank_ = r1.heads, bank
        self.stage1_labels_ = self._scatter(r1.labels, kept, n_total)
        labels, conf = r1.labels, r1.conf
        self.mode_, self.head_, self.tuned_ = "stage1", None, None

        if self.stage == 2:
            with phases("stage2"):
                if inputs.source is not None:
                    # tune a copy: the user's encoder object and the cached pristine CLIP stay as
                    # they were, so a second fit starts from the same weights as the first
                    tunable = copy.deepcopy(encoder)
                    source, mode = KeptSource(inputs.source, kept), "encoder"
                else:
                    source, tunable, mode = TensorSource(u.cpu()), stage2.FeatureAdapter(d, cfg.stage2).to(device), "adapter"
                head = copy.deepcopy(r1.heads.image)
                ckpt2 = ws.path("stage2.ckpt")
                r2 = stage2.train_stage2(tunable, source, head, r1.labels, r1.conf, k, cfg.stage2, mode=mode,
                                         seed=self.seed, progress=self.progress, checkpoint=ckpt2, resume=self.resume)
            self.mode_, self.head_, self.tuned_ = mode, r2.head, tunable
            module = getattr(tunable, "model", tunable)
            self._tuned_keys = [n_ for n_, q in module.named_parameters() if q.requires_grad]
            labels, conf = r2.labels.to(device), r2.conf.to(device)
            centers = r2.centers
            self.stage2_history_ = r2.history
        else:
            centers, _ = ops.center_update(u, k, labels=labels.to(u.device))
        self.cluster_centers_ = centers.float().cpu().numpy()
        self.labels_ = self._scatter(labels, kept, n_total)
        self.confidences_ = self._scatter(conf, kept, n_total, fill=0.0, dtype=np.float32)
        self.skipped_ = report
        self.n_features_in_ = d
        self.history_ = {
            "stage1": r1.history,
            "stage2": getattr(self, "stage2_history_", []),
            "seconds": phases.seconds,
            "phases": phases.rows,
            "kmeans_objective": space.kmeans_objective,
            "nouns_total": int(bank_all.shape[0]),
            "nouns_selected": int(bank.shape[0]),
            "skipped": report.count,
            "knn_recall": recall if cfg.stage1.knn_method != "exact" and cfg.stage1.knn_recall_sample else None,
        }
        log.info("fit phases:\n%s", phases.table())
        self._config = cfg
        return self

    def _run_id(self, inputs: Inputs, u: Optional[Tensor], bank: Tensor, cfg: Config) -> str:
        """What a workspace must match to be reused: the data, the nouns, K, the seed and
        the settings of the phases it caches."""
        data = inputs.store.fingerprint() if inputs.store is not None else fingerprint(u)
        knn = {f: getattr(cfg.stage1, f) for f in ("knn_k", "knn_method", "knn_nlist", "knn_nprobe")}
        settings = {"k": int(self.n_clusters), "seed": self.seed, "semantic": cfg.to_dict()["semantic"],
                    "counterparts": cfg.to_dict()["counterparts"], "knn": knn,
                    "data": data, "nouns": fingerprint(bank)}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    @staticmethod
    def _store_rows(store: EmbeddingStore, ws: Workspace, cfg: Config) -> Tensor:
        """The store's rows as one [N, D] fp16 tensor without reading them into memory: the
        one shard itself, or the shards copied into one memory-mapped workspace file."""
        if store.shard_count == 1:
            return as_tensor(store.shard(0))
        got = ws.get("images")
        if got is not None:
            return got

        def copy_rows(out: Tensor, lo: int, hi: int) -> None:
            for s in range(lo, hi, cfg.chunks.assign):
                e = min(s + cfg.chunks.assign, hi)
                out[s:e] = torch.from_numpy(store.rows(s, e))
                release(out, *(store.shard(i) for i in range(store.shard_count)))

        return ws.fill("images", (len(store), store.dim), torch.float16, copy_rows)

    @staticmethod
    def _scatter(values: Tensor, kept: Tensor, n: int, fill: float = -1, dtype: Any = np.int64) -> np.ndarray:
        out = np.full(n, fill, dtype=dtype)
        out[kept.cpu().numpy()] = values.detach().cpu().numpy().astype(dtype)
        return out

    def fit_predict(self, X: InputLike, y: Any = None, nouns: Any = None) -> np.ndarray:
        """`fit(X)` then `labels_` ([N] int64; -1 marks unreadable images)."""
        return self.fit(X, nouns=nouns).labels_

    # ---- prediction --------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "heads_"):
            raise RuntimeError("this SemanticClusterer is not fitted yet: call fit() or load() first")

    def _features_for_prediction(self, X: InputLike) -> tuple[list[Tensor], Tensor, int]:
        """(row blocks of features [n_b, D], kept source indices [n], N). A store gives one
        block per memory-mapped shard; `_proba_chunks` reads every block chunk by chunk."""
        self._check_fitted()
        cfg = self._config
        inputs = as_inputs(X)
        if inputs.source is None and self.mode_ == "encoder":
            raise ValueError("this model fine-tuned its image encoder: predict from images, not embeddings")
        if inputs.source is not None:
            encoder = self.tuned_ if self.mode_ == "encoder" else self._encoder()
            u, kept, _ = _encode(encoder, inputs.source, cfg.chunks.encode_batch, self.progress)
            blocks, n = [u], len(inputs.source)
        elif inputs.store is not None:
            store = inputs.store
            blocks = [as_tensor(store.shard(i)) for i in range(store.shard_count)]
            n = len(store)
            kept = torch.arange(n)
            if store.dim != self.n_features_in_:
                raise ValueError(f"the store has dim {store.dim} but the model was fitted on dim {self.n_features_in_}")
        else:
            blocks, kept, n = [inputs.embeddings], torch.arange(inputs.embeddings.shape[0]), inputs.embeddings.shape[0]
        for b in blocks:
            ops.validate.matrix("embeddings", b, cols=self.n_features_in_)
        return blocks, kept, n

    @torch.no_grad()
    def _proba_chunks(self, blocks: list[Tensor]) -> Iterator[Tensor]:
        """[chunk, K] probabilities, one row chunk at a time (never all N x K at once)."""
        cfg = self._config
        step = cfg.chunks.assign
        device = self._device()
        for u in blocks:
            for s in range(0, u.shape[0], step):
                uc = torch.nn.functional.normalize(u[s : s + step].to(device).float(), dim=1)
                release(u)
                if self.mode_ == "stage1":
                    # the text head's input is needed only when both heads predict
                    v = (counterparts.text_counterparts(uc, self.noun_bank_, cfg.counterparts, cfg.chunks)
                         if cfg.stage1.predict_with == "both" else None)
                    yield self.heads_.predict_proba(uc, v)
                else:
                    z = self.tuned_.image_features(uc) if self.mode_ == "adapter" else uc
                    self.head_.eval()
                    yield torch.softmax(self.head_(z), dim=1)

    def predict_proba(self, X: InputLike) -> np.ndarray:
        """[N, K] cluster probabilities (rows of unreadable images are NaN)."""
        blocks, kept, n = self._features_for_prediction(X)
        out = np.full((n, self.n_clusters), np.nan, dtype=np.float32)
        out[kept.cpu().numpy()] = torch.cat([p.cpu() for p in self._proba_chunks(blocks)]).numpy()
        return out

    def predict(self, X: InputLike) -> np.ndarray:
        """[N] cluster ids (-1 for unreadable images), computed chunk by chunk."""
        blocks, kept, n = self._features_for_prediction(X)
        labels = torch.cat([p.argmax(1).cpu() for p in self._proba_chunks(blocks)])
        return self._scatter(labels, kept, n)

    # ---- persistence -------------------------------------------------------------------

    def _tuned_state(self) -> dict[str, Tensor]:
        if self.mode_ == "adapter":
            return {f"adapter.{k}": v for k, v in self.tuned_.state_dict().items()}
        if self.mode_ == "encoder":
            module = getattr(self.tuned_, "model", self.tuned_)
            if self.pretrained is None or not isinstance(self.clip, (str, os.PathLike)):
                # random or user-made weights cannot be rebuilt from a name: keep all of them
                return {f"encoder.{k}": v for k, v in module.state_dict().items()}
            state = module.state_dict()
            return {f"encoder.{n}": state[n] for n in self._tuned_keys}
        return {}

    def _clip_record(self) -> tuple[str, Optional[str], Optional[str]]:
        """(name, pretrained, sha256) as the loaded encoder resolved them (absolute paths),
        so a saved run works from any directory and notices a changed checkpoint."""
        enc = getattr(self, "_clip_encoder", None)
        if enc is None:
            return str(self.clip), self.pretrained, None
        return enc.name, enc.pretrained, enc.checkpoint_sha256

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the fitted model to directory `path` (safetensors weights + JSON), atomically
        per file, the JSON last and carrying the weights' sha256."""
        self._check_fitted()
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"heads.{k}": v for k, v in self.heads_.state_dict().items()}
        if self.head_ is not None:
            tensors.update({f"head2.{k}": v for k, v in self.head_.state_dict().items()})
        tensors.update(self._tuned_state())
        tensors["noun_bank"] = self.noun_bank_
        tensors["cluster_centers"] = torch.from_numpy(self.cluster_centers_)
        tensors["labels"] = torch.from_numpy(self.labels_)
        tensors["confidences"] = torch.from_numpy(self.confidences_)
        atomic_save_tensors(out / WEIGHTS_FILE, tensors)
        custom = not isinstance(self.clip, (str, os.PathLike))
        meta = {
            "format": MODEL_FORMAT,
            "params": {
                "n_clusters": self.n_clusters, "stage": self.stage, "seed": self.seed,
                "clip": None if custom else self._clip_record()[0], "pretrained": None if custom else self._clip_record()[1],
                "checkpoint_sha256": None if custom else self._clip_record()[2],
                "custom_encoder": type(self.clip).__name__ if custom else None,
            },
            "mode": self.mode_,
            "dim": self.n_features_in_,
            "config": self._config.to_dict(),
            "history": self.history_,
            "weights_sha256": sha256_file(out / WEIGHTS_FILE),
        }
        blob = json.dumps(meta, indent=2, default=float).encode()
        atomic_write(out / CONFIG_FILE, lambda f: f.write(blob))
        return out

    @classmethod
    def load(cls, path: Union[str, os.PathLike], clip: Any = None, device: Optional[str] = None) -> "SemanticClusterer":
        """Load a model written by `save`. A model that fine-tuned a custom encoder object
        needs that object (same architecture) as `clip`; open_clip models are rebuilt
        from the recorded name and weights."""
        root = Path(path)
        cfile, wfile = root / CONFIG_FILE, root / WEIGHTS_FILE
        if not cfile.is_file() or not wfile.is_file():
            raise ValueError(f"{root} is not a semclust model directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        try:
            meta = json.loads(cfile.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfile} is not valid JSON: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
            raise ValueError(f"{cfile} is not a {MODEL_FORMAT} file (format={meta.get('format') if isinstance(meta, dict) else None!r})")
        if sha256_file(wfile) != meta["weights_sha256"]:
            raise ValueError(f"{wfile} does not match its {CONFIG_FILE} (checksum mismatch): the model directory is corrupt or mixed")
        try:
            t = load_file(wfile)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{wfile} is not a readable safetensors file: {e}") from None
        p = meta["params"]
        if p["custom_encoder"] and clip is None and meta["mode"] == "encoder":
            raise ValueError(f"this model fine-tuned a custom {p['custom_encoder']}: pass it as load(path, clip=encoder)")
        cfg = Config.from_dict(meta["config"])
        model = cls(n_clusters=p["n_clusters"], clip=clip if clip is not None else p["clip"], pretrained=p["pretrained"],
                    stage=p["stage"], config=cfg, device=device, seed=p["seed"])
        dev = model._device()
        dim, k = meta["dim"], p["n_clusters"]
        model.heads_ = Heads(dim, k, cfg.stage1.hidden)
        model.heads_.load_state_dict(_prefixed(t, "heads."))
        model.heads_.to(dev).eval()
        model.mode_, model.head_, model.tuned_ = meta["mode"], None, None
        if model.mode_ != "stage1":
            model.head_ = ClusterHead(dim, k, cfg.stage1.hidden)
            model.head_.load_state_dict(_prefixed(t, "head2."))
            model.head_.to(dev).eval()
        if model.mode_ == "adapter":
            model.tuned_ = stage2.FeatureAdapter(dim, cfg.stage2)
            model.tuned_.load_state_dict(_prefixed(t, "adapter."))
            model.tuned_.to(dev).eval()
        if p.get("checkpoint_sha256") and not p["custom_encoder"] and model.mode_ != "adapter":
            found = model._encoder().checkpoint_sha256
            if found != p["checkpoint_sha256"]:
                raise ValueError(f"the CLIP checkpoint {p['pretrained']} changed since this model was saved (sha256 differs)")
        if model.mode_ == "encoder":
            model.tuned_ = copy.deepcopy(model._encoder())
            module = getattr(model.tuned_, "model", model.tuned_)
            tuned = _prefixed(t, "encoder.")
            model._tuned_keys = list(tuned)
            missing = module.load_state_dict(tuned, strict=False)
            if missing.unexpected_keys:
                raise ValueError(f"the saved encoder weights do not fit {type(model.tuned_).__name__}: {missing.unexpected_keys[:3]}")
        model.noun_bank_ = t["noun_bank"].to(dev)
        model.cluster_centers_ = t["cluster_centers"].numpy()
        model.labels_ = t["labels"].numpy()
        model.confidences_ = t["confidences"].numpy()
        model.n_features_in_ = dim
        model.history_ = meta.get("history", {})
        model._config = cfg
        return model


def _prefixed(t: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}
