"""Every default of the method, in one place, each checked when set.

Numbers marked (TAC) come from the official code of "Image Clustering with External
Guidance" (ICML 2024); (SEIC-r) from a public third-party reading of the seed paper;
(measured) were chosen here from runs recorded in the README / benchmarks.

Every field declares its constraint (a set of choices, or a numeric range) with
`option(...)`. A section checks all its fields when built (from Python or from the JSON
`Config.from_dict` reads) and each field again when assigned, so a typo such as
``Stage1Config(balance="dynamc")`` or ``cfg.neighbours.method = "hnsw"`` raises at once,
naming the field as a config file does ("stage1.balance") and what it accepts, instead
of training something else: ValueError, or TypeError for a value of the wrong type
(``"ten"`` epochs, ``1`` for True). Sections stay mutable (``cfg.stage1.epochs = 5`` is
checked like the constructor); `dataclasses.replace` gives a checked copy.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Optional


def option(default: Any, *, choices: Optional[tuple] = None, low: Optional[float] = None,
           high: Optional[float] = None, low_open: bool = False) -> Any:
    """A config field with its constraint: one of `choices`, or a number of the default's
    type (int or float) in [low, high] (low excluded with `low_open`)."""
    return field(default=default, metadata={"choices": choices, "low": low, "high": high, "low_open": low_open,
                                            "kind": type(default)})


def _finite(value: numbers.Real) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float (JSON allows any length)
        return False


def _check(where: str, meta: dict, value: Any) -> None:
    """Raise naming the option `where` ("stage1.epochs"): TypeError for a value of the
    wrong type, ValueError for one outside its choices or range."""
    choices = meta.get("choices")
    if choices is not None:
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            raise ValueError(f"{where} must be one of {list(choices)}, got {value!r}")
        return
    kind = meta["kind"]
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where} must be True or False, got {value!r}")
        return
    ok = isinstance(value, numbers.Integral) if kind is int else isinstance(value, numbers.Real)
    if not ok or isinstance(value, bool):
        raise TypeError(f"{where} must be {'an int' if kind is int else 'a number'}, got {value!r}")
    if kind is float and not _finite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value <= low if meta.get("low_open") else value < low):
        raise ValueError(f"{where} must be {'>' if meta.get('low_open') else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{where} must be <= {high}, got {value!r}")


class _Section:
    """Checks every declared field when built and whenever one is assigned."""

    def __setattr__(self, name: str, value: Any) -> None:
        spec = self.__dataclass_fields__.get(name)  # type: ignore[attr-defined]
        if spec is None:
            raise AttributeError(f"{type(self).__name__} has no option {name!r}; "
                                 f"options: {sorted(self.__dataclass_fields__)}")  # type: ignore[attr-defined]
        if spec.metadata:
            _check(_where(type(self), name), spec.metadata, value)
        object.__setattr__(self, name, value)


@dataclass
class ChunkConfig(_Section):
    """Row-chunk sizes that bound peak memory of the ops (memory ~ chunk x other side)."""

    assign: int = option(65536, low=1)
    retrieve: int = option(4096, low=1)
    knn_queries: int = option(4096, low=1)
    knn_database: int = option(65536, low=1)
    encode_batch_size: int = option(256, low=1)


@dataclass
class SemanticSpaceConfig(_Section):
    """Semantic-space selection: k-means on images, nouns near the centres (see
    `semclust.method.counterparts` for the two methods)."""

    method: str = option("pool", choices=("pool", "tac"))  # pool: K centres x 200 nouns; tac: N/300 centres x 5
    pool_per_centre: int = option(200, low=1)  # "pool": nouns kept per K-means centre
    images_per_centre: int = option(300, low=1)  # "tac": M = max(K, N // 300)
    nouns_per_centre: int = option(5, low=1)  # "tac": gamma
    noun_tau: float = option(0.01, low=0.0, low_open=True)  # "tac": softmax over centres when a noun votes
    kmeans_iters: int = option(100, low=1)
    kmeans_restarts: int = option(3, low=1)
    # Lloyd on at most K x this many random rows, then one pass assigns all (faiss's cap;
    # 0: every step reads all N rows). At 1M images and K = 100 a step reads 25,600 rows
    kmeans_points_per_centre: int = option(256, low=0)


@dataclass
class CounterpartConfig(_Section):
    """v_i = normalise(sum over the image's top nouns of softmax(u_i . t / tau) t)."""

    tau: float = option(0.01, low=0.0, low_open=True)  # retrieval temperature (TAC: 0.005 over all nouns)
    per_image: int = option(50, low=0)  # nouns of the pool each image mixes; 0: all of them (TAC)


@dataclass
class NeighbourConfig(_Section):
    """The kNN phase: each row's k nearest other rows, in image and in counterpart space."""

    k: int = option(50, low=1)  # (TAC)
    # exact: chunked, N^2 D; ivf: faiss, for N in the millions; auto: exact on a GPU or up to
    # exact_max_rows rows, ivf above (exact, with a warning, where faiss is not installed)
    method: str = option("auto", choices=("auto", "exact", "ivf"))
    # exact search over 10^5 rows of D = 512 takes ~1 min on a 2-core CPU, and its cost grows
    # as N^2: 10^6 rows would take hours where IVF takes ~7 min (benchmarks/RESULTS.md)
    exact_max_rows: int = option(100_000, low=0)
    # IVF cells (0: sqrt(N)) and cells scanned per query: ~4 sqrt(N) rows scanned per query,
    # as 16 of 4 sqrt(N) cells would, with a quarter of the coarse quantizer's work
    # (neighbours.default_nlist says why)
    nlist: int = option(0, low=0)
    nprobe: int = option(4, low=1)
    recall_sample: int = option(1000, low=0)  # with "ivf": queries checked against exact search, recall@k in history_


@dataclass
class Stage1Config(_Section):
    # "semclust": the cross-modal consistency loss below; "tac": TAC's head training with
    # TAC's own settings for K (`method.tac.tac_settings`), the loss options unused
    objective: str = option("semclust", choices=("semclust", "tac"))
    hidden: int = option(512, low=1)  # Linear(D,512) -> BN -> ReLU -> Linear(512,K) (TAC)
    epochs: int = option(40, low=0)  # at K >= 100 at most; see cluster_visits
    # K >= 100 (where TAC too changes its recipe): train max(4, ceil(cluster_visits K / N))
    # epochs, at most `epochs`: about this many visits of each cluster's images. There a
    # long run overfits each image's fixed counterpart and neighbours (k100 / k200: ACC
    # 0.68 / 0.57 at 4-6 epochs against 0.62 / 0.51 at 40, the same at 5x the rows), while
    # few rows per cluster need more epochs (K = 1000, N = 20k: 0.14 at 3, 0.29 at 20-40);
    # below K = 100 the superclass scenario still gains up to 40 (benchmarks/RESULTS.md).
    # 0: always `epochs`
    cluster_visits: int = option(500, low=0)
    batch_size: int = option(512, low=2)
    lr: float = option(1e-3, low=0.0, low_open=True)  # Adam (TAC)
    weight_decay: float = option(0.0, low=0.0)
    cluster_tau: float = option(0.5, low=0.0, low_open=True)  # assignment- and centre-level InfoNCE temperature (TAC)
    # K > this: each step's two cluster-level InfoNCE terms compare a fresh random subset
    # of this many clusters (their cost grows as K^2: 70% of a step at K = 1000), the
    # other terms every cluster; 0: always all K. The fused ext step has no subset, so
    # such steps run the torch loss (`method.stage1.train_stage1`)
    cluster_columns: int = option(256, low=0)
    # tau_a of the centre target softmax(v c^T / tau_a), in units of the spread of v . c
    # times min(1, 10 / K) (`method.losses.center_temperature`): 2 x 0.05 = 0.1 under a
    # CLIP-like modality gap at K <= 10
    center_tau: float = option(2.0, low=0.0, low_open=True)
    center_momentum: float = option(0.9, low=0.0, high=1.0)  # EMA of the fused image/text centres across batches
    center_target: bool = option(True)  # pull both heads to the fused centres' assignment ("better centre generation")
    w_instance: float = option(0.5, low=0.0)  # loss weights (SEIC-r: 0.5, 1, 1, 2)
    w_assignment: float = option(1.0, low=0.0)
    w_center: float = option(3.0, low=0.0)
    w_balance: float = option(2.0, low=0.0)  # weight of KL(p_bar || prior) + KL(q_bar || prior)
    balance: str = option("dynamic", choices=("dynamic", "fixed"))  # prior: estimated (dynamic) or uniform (fixed, TAC)
    balance_momentum: float = option(0.99, low=0.0, high=1.0)  # EMA of cluster shares per step
    balance_mix: float = option(0.5, low=0.0, high=1.0)  # prior = (1 - mix) shares + mix uniform
    # "image": f_I alone (measured better, see README); "both": mean of f_I and f_T
    predict_with: str = option("image", choices=("image", "both"))


@dataclass
class Stage2Config(_Section):
    epochs: int = option(10, low=0)
    batch_size: int = option(128, low=2)  # (SEIC-r)
    lr: float = option(5e-5, low=0.0, low_open=True)  # AdamW on encoder blocks (SEIC-r)
    head_lr: float = option(1e-3, low=0.0, low_open=True)
    adapter_lr: float = option(1e-3, low=0.0, low_open=True)
    weight_decay: float = option(0.01, low=0.0)
    confident_fraction: float = option(0.5, low=0.0, high=1.0, low_open=True)  # share of each cluster pseudo-labelled
    min_per_cluster: int = option(5, low=1)
    confidence_sigma: float = option(0.1, low=0.0, low_open=True)  # Gaussian fall-off below the mean confidence
    finetune_blocks: int = option(1, low=1)  # last vision transformer blocks fine-tuned
    adapter_hidden: int = option(256, low=1)
    weak_noise: float = option(0.01, low=0.0)  # feature-space views when only embeddings are given
    strong_noise: float = option(0.05, low=0.0)
    strong_dropout: float = option(0.1, low=0.0, high=1.0)
    num_workers: int = option(0, low=0)  # DataLoader workers decoding images for stage 2


# the scores `KSearchConfig.criterion` may choose K by (`semclust.method.k_search`)
K_CRITERIA = ("cross_modal_gap", "cross_modal", "silhouette")


@dataclass
class KSearchConfig(_Section):
    """n_clusters="auto": the search for K (`semclust.method.k_search`; its module doc gives
    the measurements behind each default)."""

    criterion: str = option("cross_modal_gap", choices=K_CRITERIA)  # the others were measured worse
    # rows searched, at least 20 x k_max: the search costs the same whatever N. 6000 rather than
    # 8000: -20% of its k-means (most of its cost) with the same estimates (measured)
    sample: int = option(6000, low=2)
    points: int = option(24, low=1)  # K values on a geometric grid over k_range
    eval_rows: int = option(2000, low=2)  # held-out rows scored per K
    # rows the average-linkage tree is built on (its distances: tree_rows^2 / 2 doubles, 100 MB
    # at 5000); the other sampled rows join the cluster of highest mean cosine (measured: the
    # same estimates as with 8000)
    tree_rows: int = option(5000, low=2)
    # counterpart rebuilds at the estimate, restarts per K's k-means, and draws (k-means seeds and
    # null references averaged per K, the gap statistic's B): more of each measured no better
    rounds: int = option(1, low=1)
    restarts: int = option(1, low=1)
    draws: int = option(1, low=1)
    # the chosen gap must stand above 0 at this level, Bonferroni over the K tried, or the search
    # says no K stands out from the null (`KSearch.significant`)
    level: float = option(0.05, low=0.0, low_open=True, high=1.0)


_SECTIONS = {"chunks": ChunkConfig, "semantic": SemanticSpaceConfig, "counterparts": CounterpartConfig,
             "neighbours": NeighbourConfig, "stage1": Stage1Config, "stage2": Stage2Config,
             "k_search": KSearchConfig}
_SECTION_NAMES = {kind: name for name, kind in _SECTIONS.items()}


def _where(kind: type, name: str) -> str:
    # the dotted name a JSON config uses, so one message fits Python and config files
    return f"{_SECTION_NAMES[kind]}.{name}"


def _keys(keys: Any) -> list:
    # JSON keys are strings but a Python dict may mix types, which sorted() alone refuses
    return sorted(keys, key=repr)


@dataclass
class Config:
    """All phases together; `Config.from_dict` accepts the nested dict `to_dict` writes.
    Each section is type-checked when built and when assigned (``cfg.stage1 = ...``)."""

    chunks: ChunkConfig = field(default_factory=ChunkConfig)
    semantic: SemanticSpaceConfig = field(default_factory=SemanticSpaceConfig)
    counterparts: CounterpartConfig = field(default_factory=CounterpartConfig)
    neighbours: NeighbourConfig = field(default_factory=NeighbourConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    k_search: KSearchConfig = field(default_factory=KSearchConfig)

    def __setattr__(self, name: str, value: Any) -> None:
        kind = _SECTIONS.get(name)
        if kind is None:
            raise AttributeError(f"Config has no section {name!r}; sections: {list(_SECTIONS)}")
        if not isinstance(value, kind):
            raise TypeError(f"Config.{name} must be a {kind.__name__}, got {type(value).__name__}")
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def tac(cls) -> "Config":
        """TAC's whole recipe (Li et al., ICML 2024), to compare on your own data: nouns by
        an image k-means vote (N / 300 centres x 5 nouns), retrieval at tau 0.005 over all
        of them, TAC's head training (`Stage1Config(objective="tac")`)."""
        return cls(semantic=SemanticSpaceConfig(method="tac", noun_tau=1.0),
                   counterparts=CounterpartConfig(tau=0.005, per_image=0), stage1=Stage1Config(objective="tac"))

    @classmethod
    def from_dict(cls, d: Any) -> "Config":
        """Build from a nested dict (e.g. JSON). A non-dict config or section raises
        TypeError; unknown sections or keys and bad values raise naming them
        ("stage1.epochs"): ValueError, or TypeError for a value of the wrong type."""
        if not isinstance(d, dict):
            raise TypeError(f"a config must be a dict of sections (a JSON object), got {type(d).__name__}")
        unknown = set(d) - set(_SECTIONS)
        if unknown:
            raise ValueError(f"unknown config sections {_keys(unknown)}; sections: {list(_SECTIONS)}")
        parts = {}
        for name, kind in _SECTIONS.items():
            given = d.get(name, {})
            if not isinstance(given, dict):
                raise TypeError(f"config section {name!r} must be a dict (a JSON object), got {type(given).__name__}")
            known = {f.name for f in fields(kind)}
            bad = set(given) - known
            if bad:
                raise ValueError(f"config section {name!r} has unknown keys {_keys(bad)}; keys: {sorted(known)}")
            parts[name] = kind(**given)
        return cls(**parts)


def _defaults_are_valid() -> None:
    # every declared default satisfies its own constraint (a typo in this file fails at import)
    for kind in _SECTIONS.values():
        for f in fields(kind):
            if f.metadata and f.default is not MISSING:
                _check(_where(kind, f.name), f.metadata, f.default)


_defaults_are_valid()
