"""`SemanticClusterer`: the whole method behind scikit-learn conventions.

>>> model = SemanticClusterer(n_clusters=10, clip="ViT-B-32", pretrained="/path/ckpt.pt")
>>> labels = model.fit_predict("images/")           # folder, list of paths, or a Dataset
>>> labels = model.fit_predict(U, nouns=T)          # CLIP embeddings [N, D] and nouns [W, D]

The estimator keeps its parameters verbatim, checks them (and the config) before any
work, delegates the fit to `semclust.pipeline` and prediction and persistence to the
fitted model (`semclust.model`), and builds every learned attribute afresh each fit.
"""

from __future__ import annotations

import inspect
import numbers
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
from torch import Tensor

from . import model as fitted
from . import ops, pipeline
from .config import Config
from .inputs.classify import InputLike, Inputs, as_inputs
from .runtime.distributed import is_distributed
from .runtime.mmap import as_tensor, release

CONFIG_FILE, WEIGHTS_FILE = fitted.CONFIG_FILE, fitted.WEIGHTS_FILE


class ClusterCollapseWarning(UserWarning):
    """A fit left some of the `n_clusters` clusters without a member."""


class InvalidParameterError(ValueError, TypeError):
    """A constructor parameter of the wrong type or out of range. Both a ValueError and a
    TypeError (as in scikit-learn), so callers catching either see it."""


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


# parameter -> (check, what it must be); checked at the top of `fit`, like scikit-learn's
# `_parameter_constraints`
_PARAMETER_CONSTRAINTS: dict[str, tuple[Any, str]] = {
    "n_clusters": (lambda x: (_is_int(x) and x >= 2) or (isinstance(x, str) and x == "auto"), "an int >= 2 or 'auto'"),
    "k_range": (lambda x: isinstance(x, (tuple, list)) and len(x) == 2 and all(_is_int(v) for v in x) and 2 <= x[0] <= x[1],
                "(k_min, k_max) ints with 2 <= k_min <= k_max"),
    "clip": (lambda x: x is None or isinstance(x, (str, os.PathLike)) or callable(getattr(x, "image_features", None)),
             "an open_clip name, a model-config .json, an encoder object with image_features, or None (embeddings)"),
    "pretrained": (lambda x: x is None or isinstance(x, (str, os.PathLike)), "a tag, a checkpoint path or None"),
    "nouns": (lambda x: x is not None, "'default', 'wordnet', a file, a list of words or embeddings [W, D]"),
    "stage": (lambda x: _is_int(x) and x in (1, 2), "1 or 2"),
    "config": (lambda x: x is None or isinstance(x, (Config, dict)),
               "a semclust.config.Config, a dict of its sections (Config.from_dict) or None"),
    "device": (lambda x: x is None or isinstance(x, (str, torch.device)), "a device name or None"),
    "seed": (lambda x: _is_int(x) and x >= 0, "an int >= 0"),
    "progress": (lambda x: isinstance(x, bool), "True or False"),
    "checkpoint_dir": (lambda x: x is None or isinstance(x, (str, os.PathLike)), "a directory or None"),
    "resume": (lambda x: isinstance(x, bool), "True or False"),
}


def _check_param(name: str, value: Any) -> None:
    ok, what = _PARAMETER_CONSTRAINTS[name]
    if not ok(value):
        raise InvalidParameterError(f"{name} must be {what}, got {value!r}")


def _config(value: Union[Config, dict[str, Any], None]) -> Config:
    """The `config` parameter as a Config; a dict is read by `Config.from_dict`, which
    raises ValueError naming an unknown section or key."""
    _check_param("config", value)
    if isinstance(value, dict):
        return Config.from_dict(value)
    return Config() if value is None else value


class SemanticClusterer:
    """Cluster images (or their CLIP features) into `n_clusters` groups, no labels needed.

    Stage 1 trains image and text clustering heads on frozen CLIP features with
    cross-modal semantic consistency; stage 2 (``stage=2``) fine-tunes the encoder's last
    blocks (images) or a residual adapter (embeddings only) on confident pseudo-labels.

    Parameters are stored verbatim and checked by `fit` (`InvalidParameterError`, both a
    ValueError and a TypeError), a `config` also when given; `fit` does the work. Learned attributes:
    ``labels_`` [N] (-1 for unreadable images), ``confidences_`` [N],
    ``cluster_centers_`` [K, D], ``history_`` (per-phase metrics and timings),
    ``stage1_labels_`` [N], ``skipped_`` (unreadable inputs), ``mode_`` and ``model_``
    (the fitted `semclust.model` object: "stage1", "adapter" or "encoder"), and
    ``n_clusters_`` (the K fitted: n_clusters, or the estimate of n_clusters="auto"),
    ``cluster_names_``: per cluster its `pipeline.NAMES_PER_CLUSTER` (5) best nouns as (name, score),
    best first (see `pipeline.name_clusters`); nouns given as words are named by the word,
    noun embeddings [W, D] by their row ("noun 17"); an empty cluster has none; None for
    a model saved before names existed.
    `get_params` / `set_params` follow scikit-learn, so `sklearn.base.clone` and grid
    search work; a fit that leaves clusters empty warns with `ClusterCollapseWarning`.

    Args:
        n_clusters: K >= 2 (the only positional parameter), or "auto": K estimated from the
            data within `k_range` before the fit (`method.k_search.estimate_k`: the K whose
            clusters (k-means of the counterparts or of both modalities, or the
            counterparts' average-linkage tree, whichever scores best) both modalities
            place each row in most, less the same score on a structureless null reference
            (a gap statistic), on a row sample; the scores of every K tried are in
            ``history_["k_search"]``, with ``significant``: False, and a logged warning,
            when no K stands out from the null, and ``unscorable``: the K the sample holds too
            few distinct images for); the K used is ``n_clusters_``.
        k_range: (k_min, k_max) searched when n_clusters="auto".
        clip: an open_clip model name, a model-config .json, or an encoder object with
            ``image_features``, ``tail_parameters`` and ``view_transform`` (see stage2).
        pretrained: open_clip pretrained tag or local checkpoint file (None: random, tests).
        nouns: noun vocabulary: "default", "wordnet", a text file, a list of words, or
            noun embeddings [W, D]; `fit(..., nouns=...)` overrides it.
        stage: 1 (heads only) or 2 (plus self-enhancement).
        config: a `semclust.config.Config` (defaults from DESIGN.md), or the nested dict
            `Config.from_dict` reads (checked here: an unknown section or key raises).
        device: "cpu", "cuda", ... (default: cuda when available).
        checkpoint_dir: the fit's working directory: per-row intermediates (memory-mapped
            .npy: text counterparts, kNN lists, consolidated store rows) and the stage-1 /
            stage-2 training state after every epoch (`stage1.ckpt`, `stage2.ckpt`), all
            written atomically; with `resume=True` a killed fit reuses the finished
            phases and continues training from the last checkpoint.
    """

    def __init__(
        self,
        n_clusters: Union[int, str] = 10,
        *,
        k_range: tuple[int, int] = (2, 200),
        clip: Any = "ViT-B-32",
        pretrained: Optional[str] = "openai",
        nouns: Any = "default",
        stage: int = 2,
        config: Optional[Union[Config, dict[str, Any]]] = None,
        device: Optional[str] = None,
        seed: int = 0,
        progress: bool = False,
        checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
        resume: bool = False,
    ) -> None:
        self.n_clusters = n_clusters
        self.k_range = k_range
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
        # the one parameter checked here: a typo in a config key fails where it is written,
        # naming the key, instead of at the next fit
        _config(config)

    # ---- parameters (scikit-learn conventions) -----------------------------------------

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor parameters by name (`deep` is accepted for scikit-learn)."""
        return {name: getattr(self, name) for name in _PARAMETER_CONSTRAINTS}

    def set_params(self, **params: Any) -> "SemanticClusterer":
        """Set constructor parameters by name; unknown names raise ValueError."""
        unknown = set(params) - set(_PARAMETER_CONSTRAINTS)
        if unknown:
            raise ValueError(f"unknown parameters {sorted(unknown)} for SemanticClusterer; "
                             f"valid: {sorted(_PARAMETER_CONSTRAINTS)}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        # parameters set away from their defaults (arrays and encoders compare by identity)
        defaults = {n: q.default for n, q in inspect.signature(type(self).__init__).parameters.items()}
        plain = (str, int, float, bool, type(None))
        shown = {k: v for k, v in self.get_params().items()
                 if k == "n_clusters" or not (v is defaults[k] or isinstance(v, plain) and v == defaults[k])}
        return f"SemanticClusterer({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def _check_params(self) -> Config:
        """Check every parameter; returns the config to fit with."""
        for name in _PARAMETER_CONSTRAINTS:
            _check_param(name, getattr(self, name))
        return _config(self.config)

    def _device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def _encoder(self) -> Any:
        if not isinstance(self.clip, (str, os.PathLike)):
            return self.clip
        if getattr(self, "_clip_encoder", None) is None:
            from .clip.encoder import ClipEncoder

            self._clip_encoder = ClipEncoder.load(self.clip, self.pretrained, device=self._device())
        return self._clip_encoder

    # ---- fitting -----------------------------------------------------------------------

    def fit(self, X: InputLike, y: Any = None, nouns: Any = None) -> "SemanticClusterer":
        """Fit on images or embeddings (see the class doc); `y` is ignored (sklearn API).

        An embedding store is read memory-mapped and every per-row intermediate (text
        counterparts, kNN lists) lives in a workspace on disk (`checkpoint_dir`, else a
        temporary directory beside the store), so peak memory follows `config.chunks`,
        not N; with `resume=True` finished phases are reused.
        """
        cfg = self._check_params()
        inputs = as_inputs(X)
        if is_distributed() and inputs.source is not None:
            raise ValueError("a distributed fit reads embeddings: run `semclust embed` first and fit the store")
        if inputs.store is not None and self.checkpoint_dir is None:
            with tempfile.TemporaryDirectory(prefix=".semclust-fit-", dir=inputs.store.path.parent) as tmp:
                return self._fit(inputs, cfg, nouns, Path(tmp))
        return self._fit(inputs, cfg, nouns, None if self.checkpoint_dir is None else Path(self.checkpoint_dir))

    def _fit(self, inputs: Inputs, cfg: Config, nouns: Any, work_dir: Optional[Path]) -> "SemanticClusterer":
        auto = self.n_clusters == "auto"
        r = pipeline.fit(inputs, k=None if auto else int(self.n_clusters), k_range=tuple(self.k_range),
                         stage=self.stage, cfg=cfg, seed=self.seed, device=self._device(), encoder=self._encoder,
                         nouns=self.nouns if nouns is None else nouns, work_dir=work_dir,
                         resume=self.resume, progress=self.progress,
                         keep_all_encoder_weights=self.pretrained is None or not isinstance(self.clip, (str, os.PathLike)))
        self.model_ = r.model
        self.mode_ = r.model.kind
        self.stage1_labels_ = _scatter(r.stage1_labels, r.kept, r.n_total)
        self.labels_ = _scatter(r.labels, r.kept, r.n_total)
        self.confidences_ = _scatter(r.conf, r.kept, r.n_total, fill=0.0, dtype=np.float32)
        self.cluster_centers_ = r.centers.float().cpu().numpy()
        self.skipped_ = r.report
        self.n_features_in_ = r.dim
        self.history_ = r.history
        self.n_clusters_ = k = int(r.centers.shape[0])
        self.cluster_names_ = r.names
        self._config = cfg
        sizes = np.bincount(self.labels_[self.labels_ >= 0], minlength=k)
        if (sizes == 0).any():
            empty = np.flatnonzero(sizes == 0).tolist()
            warnings.warn(
                f"{len(empty)} of {k} clusters are empty after the fit (clusters {empty[:10]}"
                f"{'...' if len(empty) > 10 else ''}): fewer distinct clusters than n_clusters; a larger "
                "config.stage1.w_balance, balance='fixed' or a smaller n_clusters may help",
                ClusterCollapseWarning, stacklevel=3)
        return self

    def fit_predict(self, X: InputLike, y: Any = None, nouns: Any = None) -> np.ndarray:
        """`fit(X)` then `labels_` ([N] int64; -1 marks unreadable images)."""
        return self.fit(X, nouns=nouns).labels_

    # ---- prediction --------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise RuntimeError("this SemanticClusterer is not fitted yet: call fit() or load() first")

    def _features_for_prediction(self, X: InputLike) -> tuple[list[Tensor], Tensor, int]:
        """(row blocks of features [n_b, D], kept source indices [n], N). A store gives one
        block per memory-mapped shard; `_proba_chunks` reads every block chunk by chunk."""
        self._check_fitted()
        cfg = self._config
        inputs = as_inputs(X)
        if inputs.source is None and self.mode_ == fitted.EncoderModel.kind:
            raise ValueError("this model fine-tuned its image encoder: predict from images, not embeddings")
        if inputs.source is not None:
            encoder = self.model_.image_encoder(self._encoder())
            u, kept, _ = pipeline.encode_source(encoder, inputs.source, cfg.chunks.encode_batch_size, self.progress)
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
        step = self._config.chunks.assign
        device = self._device()
        for u in blocks:
            for s in range(0, u.shape[0], step):
                uc = ops.normalize_rows(u[s : s + step].to(device), dtype=torch.float32)
                release(u)
                yield self.model_.proba(uc)

    def predict_proba(self, X: InputLike) -> np.ndarray:
        """[N, K] cluster probabilities (rows of unreadable images are NaN)."""
        blocks, kept, n = self._features_for_prediction(X)
        out = np.full((n, self.n_clusters_), np.nan, dtype=np.float32)
        out[kept.cpu().numpy()] = torch.cat([p.cpu() for p in self._proba_chunks(blocks)]).numpy()
        return out

    def predict(self, X: InputLike) -> np.ndarray:
        """[N] cluster ids (-1 for unreadable images), computed chunk by chunk."""
        blocks, kept, n = self._features_for_prediction(X)
        labels = torch.cat([p.argmax(1).cpu() for p in self._proba_chunks(blocks)])
        return _scatter(labels, kept, n)

    # ---- persistence -------------------------------------------------------------------

    def _clip_record(self) -> tuple[Optional[str], Optional[str], Optional[str], Optional[str]]:
        """(name, pretrained, sha256, custom class) as the loaded encoder resolved them
        (absolute paths), so a saved run works from any directory and notices a changed
        checkpoint; a custom encoder object is recorded by its class name only."""
        if not isinstance(self.clip, (str, os.PathLike)):
            return None, None, None, type(self.clip).__name__
        enc = getattr(self, "_clip_encoder", None)
        if enc is None:
            return str(self.clip), self.pretrained, None, None
        return enc.name, enc.pretrained, enc.checkpoint_sha256, None

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the fitted model to directory `path` (`semclust.model` owns the format:
        safetensors weights + JSON, atomically per file, the JSON last)."""
        self._check_fitted()
        name, pretrained, sha, custom = self._clip_record()
        params = {"n_clusters": self.n_clusters_, "stage": self.stage, "seed": self.seed, "clip": name,
                  "pretrained": pretrained, "checkpoint_sha256": sha, "custom_encoder": custom}
        return fitted.save(path, self.model_, params=params, dim=self.n_features_in_, history=self.history_,
                           cluster_centers=self.cluster_centers_, labels=self.labels_, confidences=self.confidences_,
                           cluster_names=self.cluster_names_)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], clip: Any = None, device: Optional[str] = None) -> "SemanticClusterer":
        """Load a model written by `save`. A model that fine-tuned a custom encoder object
        needs that object (same architecture) as `clip`; open_clip models are rebuilt
        from the recorded name and weights."""
        loaded = fitted.read(path)
        meta, p = loaded.meta, loaded.meta["params"]
        if p["custom_encoder"] and clip is None and meta["mode"] == fitted.EncoderModel.kind:
            raise ValueError(f"this model fine-tuned a custom {p['custom_encoder']}: pass it as load(path, clip=encoder)")
        model = cls(p["n_clusters"], clip=clip if clip is not None else p["clip"], pretrained=p["pretrained"],
                    stage=p["stage"], config=loaded.config, device=device, seed=p["seed"])
        needs_encoder = not p["custom_encoder"] and meta["mode"] != fitted.AdapterModel.kind
        if p.get("checkpoint_sha256") and needs_encoder and model._encoder().checkpoint_sha256 != p["checkpoint_sha256"]:
            raise ValueError(f"the CLIP checkpoint {p['pretrained']} changed since this model was saved (sha256 differs)")
        encoder = model._encoder() if meta["mode"] == fitted.EncoderModel.kind else None
        model.model_ = fitted.build(loaded, model._device(), encoder)
        model.n_clusters_ = int(p["n_clusters"])
        model.mode_ = model.model_.kind
        t = loaded.tensors
        model.cluster_centers_ = t["cluster_centers"].numpy()
        model.labels_ = t["labels"].numpy()
        model.confidences_ = t["confidences"].numpy()
        model.n_features_in_ = meta["dim"]
        model.history_ = meta.get("history", {})
        model.cluster_names_ = fitted.cluster_names(loaded)
        model._config = loaded.config
        return model


def _scatter(values: Tensor, kept: Tensor, n: int, fill: float = -1, dtype: Any = np.int64) -> np.ndarray:
    out = np.full(n, fill, dtype=dtype)
    out[kept.cpu().numpy()] = values.detach().cpu().numpy().astype(dtype)
    return out
