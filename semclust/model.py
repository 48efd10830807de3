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

    semclust.json          {"format", "params", "mode", "dim", "config", "history", "weights_sha256",
                            "cluster_names", "cluster_name_scores"}
    weights.safetensors    heads.*, head2.*, adapter.* | encoder.*, noun_bank, cluster_centers,
                           labels, confidences

`cluster_names` (optional: runs saved before names were added lack it) holds per cluster
a list of noun names, best first, or one name (as `semclust report` reads it: names may
be written by hand); `cluster_name_scores` (optional) the matching lists of scores. Both files are written atomically, the JSON last and carrying the weights' sha256, so a
reader never pairs a config with other weights. `read` trusts nothing in the directory:
`semclust.json` is checked against `SCHEMA` (`check_meta`), both files must lie inside
the directory (no symlink out), the weights are safetensors (no pickle runs) and must
agree with the JSON (`mode`, `dim`, `params.n_clusters`); each failure is one ValueError
line "invalid model file <path>: ...".
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

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
KINDS = (Stage1Model.kind, AdapterModel.kind, EncoderModel.kind)
# mode -> the prefixes of the tensors its model needs; "encoder" also holds "encoder.*",
# the encoder parameters stage 2 tuned (possibly none)
_NEEDS = {Stage1Model.kind: ("heads.",), AdapterModel.kind: ("heads.", "head2.", "adapter."),
          EncoderModel.kind: ("heads.", "head2.")}
_MAY_HOLD = {EncoderModel.kind: ("encoder.",)}
_PER_ROW = ("noun_bank", "cluster_centers", "labels", "confidences")
_ABSENT = object()


def _int(low: int) -> Callable[[Any], bool]:
    return lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= low


def _optional_str(x: Any) -> bool:
    return x is None or isinstance(x, str)


def _names_ok(x: Any) -> bool:
    # what `semclust report` shows: per cluster a name or a list of names
    return x is _ABSENT or isinstance(x, list) and all(
        isinstance(row, str) or isinstance(row, list) and all(isinstance(n, str) for n in row) for row in x)


def _scores_ok(x: Any) -> bool:
    # per cluster a list of numbers (an int is a number here, a bool is not)
    return x is _ABSENT or isinstance(x, list) and all(
        isinstance(row, list) and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in row) for row in x)


def _name_rows(names: list) -> list[list[str]]:
    return [[row] if isinstance(row, str) else row for row in names]


# Every field of semclust.json that `build` and `SemanticClusterer.load` read: dotted name
# -> (check, what it must be). Checked in order (a section before its fields); fields not
# listed are ignored. Optional ones accept `_ABSENT`.
SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "weights_sha256": (lambda x: isinstance(x, str) and re.fullmatch("[0-9a-f]{64}", x) is not None,
                       "a sha256 hex digest (64 lowercase hex digits)"),
    "mode": (lambda x: isinstance(x, str) and x in KINDS, f"one of {list(KINDS)}"),
    "dim": (_int(1), "an int >= 1"),
    "params": (lambda x: isinstance(x, dict), "an object"),
    "params.n_clusters": (_int(2), "an int >= 2"),
    "params.stage": (lambda x: _int(1)(x) and x <= 2, "1 or 2"),
    "params.seed": (_int(0), "an int >= 0"),
    "params.clip": (_optional_str, "a string or null"),
    "params.pretrained": (_optional_str, "a string or null"),
    "params.custom_encoder": (_optional_str, "a string or null"),
    "params.checkpoint_sha256": (lambda x: x is _ABSENT or _optional_str(x), "a string or null"),
    "config": (lambda x: isinstance(x, dict), "an object (the sections of semclust.config.Config)"),
    "history": (lambda x: x is _ABSENT or isinstance(x, dict), "an object"),
    "cluster_names": (_names_ok, "a list with a string or a list of strings per cluster"),
    "cluster_name_scores": (_scores_ok, "a list of lists of numbers (the scores of each cluster's names)"),
}


def _invalid(where: Union[str, Path], what: str) -> ValueError:
    return ValueError(f"invalid model file {where}: {what}")


def _first_line(e: BaseException) -> str:
    return next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_meta(meta: Any, where: Union[str, Path]) -> None:
    """Check the parsed semclust.json `meta` against `SCHEMA` (and its format); ValueError
    "invalid model file <where>: field <name> ..." for the first field that fails."""
    if not isinstance(meta, dict):
        raise _invalid(where, f"it must hold a JSON object, not {type(meta).__name__}")
    if meta.get("format") != MODEL_FORMAT:
        found = meta.get("format", _ABSENT)
        raise _invalid(where, f"field format is {'missing' if found is _ABSENT else _short(found)}, "
                              f"so it is not a {MODEL_FORMAT} file")
    for name, (ok, what) in SCHEMA.items():
        parent, _, key = name.rpartition(".")
        value = (meta[parent] if parent else meta).get(key, _ABSENT)
        if not ok(value):
            state = "is missing" if value is _ABSENT else f"is {_short(value)}"
            raise _invalid(where, f"field {name} {state}; it must be {what}")
    # names may come without scores (written by hand), scores never without their names
    names, scores = meta.get("cluster_names", _ABSENT), meta.get("cluster_name_scores", _ABSENT)
    if scores is not _ABSENT and (names is _ABSENT or [len(r) for r in _name_rows(names)] != [len(r) for r in scores]):
        raise _invalid(where, "field cluster_name_scores must hold one score per name of field cluster_names")


# per cluster its (name, score) pairs, best first; the score is None for names saved without one
ClusterNames = list[list[tuple[str, Optional[float]]]]


def save(path: Union[str, Path], model: FittedModel, *, params: dict[str, Any], dim: int, history: dict,
         cluster_centers: np.ndarray, labels: np.ndarray, confidences: np.ndarray,
         cluster_names: Optional[ClusterNames] = None) -> Path:
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
    if cluster_names is not None:
        # names and scores apart: `semclust report` reads cluster_names as lists of strings
        meta["cluster_names"] = [[name for name, _ in row] for row in cluster_names]
        meta["cluster_name_scores"] = [[score for _, score in row] for row in cluster_names]
    blob = json.dumps(meta, indent=2, default=float).encode()
    atomic_write(out / CONFIG_FILE, lambda f: f.write(blob))
    return out


@dataclass
class Loaded:
    meta: dict[str, Any]
    config: Config
    tensors: dict[str, Tensor]
    path: Path  # the semclust.json the errors name


def _inside(root: Path, name: str) -> Path:
    # a model directory may be someone else's: a symlinked file must not lead the reader
    # (and its error messages) to a file elsewhere on this machine
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()):
        raise _invalid(path, f"{name} points outside the model directory {root}")
    return path


def _check_weights(t: dict[str, Tensor], meta: dict[str, Any], where: Path) -> None:
    """The tensors agree with the JSON: the groups its mode needs (and no others), per-row
    results of [n_clusters, dim] / [N] shapes."""
    mode, dim, k = meta["mode"], meta["dim"], meta["params"]["n_clusters"]
    missing = [n for n in _PER_ROW if n not in t] + [f"{p}*" for p in _NEEDS[mode] if not _prefixed(t, p)]
    if missing:
        raise _invalid(where, f"field mode {mode!r} needs tensors {missing} that the weights lack")
    allowed = _NEEDS[mode] + _MAY_HOLD.get(mode, ())
    stray = sorted({n.split(".")[0] + ".*" for n in t if n not in _PER_ROW and not n.startswith(allowed)})
    if stray:
        raise _invalid(where, f"field mode {mode!r} does not match the weights, which also hold {stray}")
    centers, nouns, labels, conf = t["cluster_centers"], t["noun_bank"], t["labels"], t["confidences"]
    if centers.dim() != 2 or centers.shape[0] != k:
        raise _invalid(where, f"field params.n_clusters is {k} but the weights hold {tuple(centers.shape)} cluster centres")
    if centers.shape[1] != dim or nouns.dim() != 2 or nouns.shape[1] != dim:
        raise _invalid(where, f"field dim is {dim} but the weights hold centres {tuple(centers.shape)} "
                              f"and nouns {tuple(nouns.shape)}")
    if labels.dim() != 1 or conf.shape != labels.shape:
        raise _invalid(where, f"labels {tuple(labels.shape)} and confidences {tuple(conf.shape)} must be [N] each")
    # checked after the centres, which confirm n_clusters (a names list alone could be the odd one)
    names = meta.get("cluster_names")
    if names is not None and len(names) != k:
        raise _invalid(where, f"field cluster_names holds {len(names)} clusters but params.n_clusters is {k}")


def read(path: Union[str, Path]) -> Loaded:
    """The checked contents of a model directory (see the module doc); ValueError, one
    line, for anything that is not a whole, consistent model written by `save`."""
    root = Path(path)
    cfile, wfile = root / CONFIG_FILE, root / WEIGHTS_FILE
    if not cfile.is_file() or not wfile.is_file():
        raise ValueError(f"{root} is not a semclust model directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    cfile, wfile = _inside(root, CONFIG_FILE), _inside(root, WEIGHTS_FILE)
    try:
        meta = json.loads(cfile.read_text())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, an over-long int
        raise _invalid(cfile, f"not valid JSON ({type(e).__name__}: {_first_line(e)})") from None
    check_meta(meta, cfile)
    if sha256_file(wfile) != meta["weights_sha256"]:
        raise _invalid(wfile, f"it does not match field weights_sha256 of its {CONFIG_FILE} (checksum mismatch): "
                              "the model directory is corrupt or mixed")
    try:
        t = load_file(wfile)
    except (SafetensorError, OSError) as e:
        raise _invalid(wfile, f"not a readable safetensors file ({_first_line(e)})") from None
    _check_weights(t, meta, cfile)
    try:
        config = Config.from_dict(meta["config"])
    except (ValueError, TypeError) as e:
        raise _invalid(cfile, f"field config: {e}") from None
    return Loaded(meta, config, t, cfile)


def cluster_names(loaded: Loaded) -> Optional[ClusterNames]:
    """The saved (name, score) pairs of every cluster; None for a run saved without names."""
    names = loaded.meta.get("cluster_names")
    if names is None:
        return None
    rows = _name_rows(names)
    scores = loaded.meta.get("cluster_name_scores") or [[None] * len(row) for row in rows]
    return [list(zip(row, row_scores, strict=True)) for row, row_scores in zip(rows, scores, strict=True)]


def _prefixed(t: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}


def _load_state(m: nn.Module, state: dict[str, Tensor], prefix: str, where: Path, strict: bool = True) -> Any:
    try:
        return m.load_state_dict(state, strict=strict)
    except RuntimeError as e:  # torch's message is a header then one line per tensor: keep the first tensor's
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        raise _invalid(where, f"the {prefix}* weights do not fit the model that fields dim, params.n_clusters and "
                              f"config describe ({lines[min(1, len(lines) - 1)]})") from None


def _module(m: nn.Module, t: dict[str, Tensor], prefix: str, where: Path, device: torch.device) -> nn.Module:
    _load_state(m, _prefixed(t, prefix), prefix, where)
    return m.to(device).eval()


def build(loaded: Loaded, device: torch.device, encoder: Optional[Any] = None) -> FittedModel:
    """The fitted model of a `read` directory on `device`. An "encoder" model needs the
    pristine `encoder` (same architecture) its tuned weights are loaded into (a copy)."""
    meta, cfg, t, where = loaded.meta, loaded.config, loaded.tensors, loaded.path
    dim, k = meta["dim"], meta["params"]["n_clusters"]
    heads = _module(Heads(dim, k, cfg.stage1.hidden), t, "heads.", where, device)
    common = dict(heads=heads, noun_bank=t["noun_bank"].to(device), config=cfg)
    kind = meta["mode"]
    if kind == Stage1Model.kind:
        return Stage1Model(**common)
    head = _module(ClusterHead(dim, k, cfg.stage1.hidden), t, "head2.", where, device)
    if kind == AdapterModel.kind:
        adapter = _module(FeatureAdapter(dim, cfg.stage2), t, "adapter.", where, device)
        return AdapterModel(**common, head=head, adapter=adapter)
    tuned_encoder = copy.deepcopy(encoder)
    module = getattr(tuned_encoder, "model", tuned_encoder)
    tuned = _prefixed(t, "encoder.")
    missing = _load_state(module, tuned, "encoder.", where, strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"the saved encoder weights do not fit {type(tuned_encoder).__name__}: {missing.unexpected_keys[:3]}")
    return EncoderModel(**common, head=head, encoder=tuned_encoder, tuned_keys=list(tuned))
