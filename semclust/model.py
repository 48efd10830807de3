"""The three kinds of fitted model and the `semclust-model/1` directory format.

* `Stage1Model`: the stage-1 heads on frozen CLIP features (images are encoded with the
  pristine encoder);
* `AdapterModel`: stage 2 on embeddings only: a residual adapter on the frozen features
  and the fine-tuned image head;
* `EncoderModel`: stage 2 on images: the fine-tuned encoder and image head (it predicts
  from images only: its features are not the ones a store holds).

Each has `kind` (the string `SemanticClusterer.mode_` reports), `image_encoder(default)`
(what encodes images for prediction), `proba(u)` ([chunk, K] probabilities of L2-normalised
features u [chunk, D]) and `tensors()` (its weights for the file). The directory format is
owned here, the way `inputs.store` owns `semclust-embeddings/1`:

    semclust.json          {"format", "params", "mode", "dim", "config", "history", "weights_sha256"}
    weights.safetensors    heads.*, head2.*, adapter.* | encoder.*, noun_bank, cluster_centers,
                           labels, confidences

Both files are written atomically, the JSON last and carrying the weights' sha256, so a
reader never pairs a config with other weights.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from .config import Config
from .method import counterparts
from .method.heads import ClusterHead, Heads
from .method.stage2 import FeatureAdapter
from .runtime.files import atomic_save_tensors, atomic_write, sha256_file

MODEL_FORMAT = "semclust-model/1"
CONFIG_FILE = "semclust.json"
WEIGHTS_FILE = "weights.safetensors"


@dataclass
class Stage1Model:
    heads: Heads
    noun_bank: Tensor  # [W', D] the kept nouns (text counterparts of new images)
    config: Config
    kind = "stage1"

    def image_encoder(self, default: Any) -> Any:
        return default

    @torch.no_grad()
    def proba(self, u: Tensor) -> Tensor:
        # the text head's input is needed only when both heads predict
        v = (counterparts.text_counterparts(u, self.noun_bank, self.config.counterparts, self.config.chunks).to(u.device)
             if self.config.stage1.predict_with == "both" else None)
        return self.heads.predict_proba(u, v)

    def tensors(self) -> dict[str, Tensor]:
        return {f"heads.{k}": v for k, v in self.heads.state_dict().items()} | {"noun_bank": self.noun_bank}


@dataclass
class AdapterModel(Stage1Model):
    head: ClusterHead = None  # type: ignore[assignment]
    adapter: FeatureAdapter = None  # type: ignore[assignment]
    kind = "adapter"

    @torch.no_grad()
    def proba(self, u: Tensor) -> Tensor:
        self.head.eval()
        return torch.softmax(self.head(self.adapter.image_features(u)), dim=1)

    def tensors(self) -> dict[str, Tensor]:
        return (super().tensors() | {f"head2.{k}": v for k, v in self.head.state_dict().items()}
                | {f"adapter.{k}": v for k, v in self.adapter.state_dict().items()})


@dataclass
class EncoderModel(Stage1Model):
    head: ClusterHead = None  # type: ignore[assignment]
    encoder: Any = None  # the fine-tuned copy of the encoder
    tuned_keys: list[str] = field(default_factory=list)  # its parameters that stage 2 changed
    keep_all: bool = False  # weights that cannot be rebuilt from a name: save every parameter
    kind = "encoder"

    def image_encoder(self, default: Any) -> Any:
        return self.encoder

    @torch.no_grad()
    def proba(self, u: Tensor) -> Tensor:
        self.head.eval()
        return torch.softmax(self.head(u), dim=1)

    def tensors(self) -> dict[str, Tensor]:
        module = getattr(self.encoder, "model", self.encoder)
        state = module.state_dict()
        keys = list(state) if self.keep_all else self.tuned_keys
        return (super().tensors() | {f"head2.{k}": v for k, v in self.head.state_dict().items()}
                | {f"encoder.{n}": state[n] for n in keys})


FittedModel = Union[Stage1Model, AdapterModel, EncoderModel]


def save(path: Union[str, Path], model: FittedModel, *, params: dict[str, Any], dim: int, history: dict,
         cluster_centers: np.ndarray, labels: np.ndarray, confidences: np.ndarray) -> Path:
    """Write `model` and the fit's per-row results to directory `path` (see the module doc)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = model.tensors() | {
        "cluster_centers": torch.from_numpy(cluster_centers),
        "labels": torch.from_numpy(labels),
        "confidences": torch.from_numpy(confidences),
    }
    atomic_save_tensors(out / WEIGHTS_FILE, tensors)
    meta = {
        "format": MODEL_FORMAT, "params": params, "mode": model.kind, "dim": dim, "config": model.config.to_dict(),
        "history": history, "weights_sha256": sha256_file(out / WEIGHTS_FILE),
    }
    blob = json.dumps(meta, indent=2, default=float).encode()
    atomic_write(out / CONFIG_FILE, lambda f: f.write(blob))
    return out


@dataclass
class Loaded:
    meta: dict[str, Any]
    config: Config
    tensors: dict[str, Tensor]


def read(path: Union[str, Path]) -> Loaded:
    """The checked contents of a model directory (format, checksum, readable weights)."""
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
    return Loaded(meta, Config.from_dict(meta["config"]), t)


def _prefixed(t: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}


def _module(m: nn.Module, state: dict[str, Tensor], device: torch.device) -> nn.Module:
    m.load_state_dict(state)
    return m.to(device).eval()


def build(loaded: Loaded, device: torch.device, encoder: Optional[Any] = None) -> FittedModel:
    """The fitted model of a `read` directory on `device`. An "encoder" model needs the
    pristine `encoder` (same architecture) its tuned weights are loaded into (a copy)."""
    meta, cfg, t = loaded.meta, loaded.config, loaded.tensors
    dim, k = meta["dim"], meta["params"]["n_clusters"]
    heads = _module(Heads(dim, k, cfg.stage1.hidden), _prefixed(t, "heads."), device)
    common = dict(heads=heads, noun_bank=t["noun_bank"].to(device), config=cfg)
    kind = meta["mode"]
    if kind == Stage1Model.kind:
        return Stage1Model(**common)
    head = _module(ClusterHead(dim, k, cfg.stage1.hidden), _prefixed(t, "head2."), device)
    if kind == AdapterModel.kind:
        adapter = _module(FeatureAdapter(dim, cfg.stage2), _prefixed(t, "adapter."), device)
        return AdapterModel(**common, head=head, adapter=adapter)
    if kind != EncoderModel.kind:
        raise ValueError(f"unknown model kind {kind!r} in {CONFIG_FILE}")
    tuned_encoder = copy.deepcopy(encoder)
    module = getattr(tuned_encoder, "model", tuned_encoder)
    tuned = _prefixed(t, "encoder.")
    missing = module.load_state_dict(tuned, strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"the saved encoder weights do not fit {type(tuned_encoder).__name__}: {missing.unexpected_keys[:3]}")
    return EncoderModel(**common, head=head, encoder=tuned_encoder, tuned_keys=list(tuned))
