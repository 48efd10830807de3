"""A synthetic cross-modal data set whose clusters are known.

It imitates what the method relies on, with every factor settable:

* **Images** are raw vectors x = [x_seen ; x_hidden] in R^(2D). x_seen = a m_k + b o_kj
  + c s_s + noise mixes the class concept m_k with a sub-class offset o_kj and a
  *style* s_s shared across classes (backgrounds, lighting): k-means on image features
  is pulled towards style and sub-classes, as on real photos.
* A **frozen encoder** E(x) = normalise(W x) with W = [I, 0] reads only x_seen: the
  class evidence in x_hidden is lost to the frozen features (the "frozen-feature
  bottleneck"), but a fine-tuned W can recover it — which is what stage 2 does with a
  real CLIP vision tower.
* **Nouns** live in the same D-dim space: class nouns near m_k, and distractors near the
  styles, near sub-classes, and at random — the vocabulary is mostly off-topic, like
  WordNet for one data set.

Realistic scenarios
-------------------
`make_scenario(name, seed, n=None, dim=None)` draws one of `SCENARIOS` (knobs in
`ScenarioSpec`). Besides the legacy set ("balanced") they add CLIP's **modality gap**
(Liang et al., "Mind the Gap", NeurIPS 2022): images and nouns each sit in a narrow cone
around their own mean direction mu_I / mu_T (cos(mu_I, mu_T) = 0.4), the class structure
beside it, so two random images have cosine ~0.57, a noun and an image of its class ~0.32
and of another class only ~0.07 less. Every realistic scenario has a nuisance *style*
(6 styles, norm 1.4 +- 30% against the class's 1.0: k-means on the frozen images reaches
ACC ~0.2 at K = 10), sub-classes, per class 6 noisy class nouns and 2 per sub-class, 3
nouns per style, 2000 random distractor nouns, and class evidence in x_hidden for a
fine-tuned encoder. Images vary only in a subspace A of 65% of the dims beside the two
means (the text-only rest B holds the nouns' text-specific parts), and distractors reach
into A with weight 0.15 only: in 64 dims this keeps random nouns as weakly aligned with
images as in CLIP's 512.

============  ======  ====  ==========================================================
scenario      N       K     differs from "gap" in
============  ======  ====  ==========================================================
balanced      5000    10    the legacy generator: make_synthetic(SyntheticSpec()), no gap
gap           5000    10    (the defaults of ScenarioSpec; 3 sub-classes per class)
superclass    5000    20    4 sub-classes each; class_scale 0.6, subclass_scale 1.1;
                            nouns name only the 80 sub-classes (0 class nouns, 3 per sub)
longtail10    5000    10    class sizes geometric, largest / smallest = 10
longtail100   5000    10    class sizes geometric, largest / smallest = 100
k100          10000   100   100 classes
k200          20000   200   200 classes
============  ======  ====  ==========================================================

Knobs (`ScenarioSpec`, values of "gap"; norms before normalisation, see its docstring):

=================================  =====  ===============================================
knob                               gap    meaning
=================================  =====  ===============================================
image_mean / text_mean             2.6/1.7  shared per-modality mean direction (the gap)
mean_cos                           0.4    cos(mu_I, mu_T)
class_scale / subclass_scale       1.0/0.8  class concept m_k / sub-class offset o_kj
style_scale, style_jitter, styles  1.4, 0.3, 6  nuisance shared across classes
noise                              1.5    image noise (in the image subspace A)
image_frac                         0.65   share of the dims beside the means images use
hidden_scale / hidden_noise        1.0/0.8  class evidence only a fine-tuned encoder sees
noun_align / style_noun_align      0.5/0.3  cos of a noun's concept part to its image side
noun_noise                         0.3    per-noun noise (synonyms differ)
distractor_leak                    0.15   a random distractor's weight in A
nouns_per_class/_subclass/_style   6/2/3  nouns naming each concept
distractor_nouns                   2000   random off-topic nouns
imbalance                          1      largest / smallest class size
=================================  =====  ===============================================

Measured at seed 0 (cosines of L2-normalised features; "own" = the image's class and
sub-class nouns, "other" = those of other classes)::

    scenario     img-img  img-own  img-other  gap   text-text  k-means ACC  TAC heads ACC
    balanced     0.05     0.27     -0.01      0.28  0.00       0.38         0.89
    gap          0.57     0.32     0.25       0.07  0.73       0.20         0.82
    superclass   0.57     0.29     0.25       0.04  0.73       0.15         0.33
    longtail10   0.58     0.32     0.25       0.07  0.73       0.19         0.52
    longtail100  0.59     0.31     0.25       0.07  0.73       0.17         0.41
    k100         0.57     0.32     0.25       0.07  0.73       0.14         0.34
    k200         0.57     0.32     0.25       0.07  0.73       0.12         0.31

(TAC heads: `semclust.tac` with TAC's settings for K, counterparts from TAC's noun filter.)

`make_synthetic` returns everything a run needs; `SyntheticEncoder` implements the small
tunable-encoder interface that `stage2` uses for CLIP towers too, and
`semclust.inputs.sources.TensorSource(raw)` serves the raw rows as the "images".
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn



@dataclass
class SyntheticSpec:
    n: int = 5000
    k: int = 10
    dim: int = 64
    subclasses: int = 3
    styles: int = 5
    class_scale: float = 1.0  # a
    subclass_scale: float = 0.8  # b
    style_scale: float = 1.2  # c
    noise: float = 2.2  # norm of the isotropic noise on x_seen
    hidden_scale: float = 1.0  # class evidence the frozen encoder cannot see
    hidden_noise: float = 0.8
    nouns_per_class: int = 8
    nouns_per_style: int = 0  # styles (lighting, background) have no nouns of their own
    noun_noise: float = 0.25
    distractor_nouns: int = 400
    imbalance: float = 1.0  # ratio of the largest to the smallest class size


@dataclass
class SyntheticSet:
    raw: Tensor  # [N, 2D] float32: the "images"
    labels: np.ndarray  # [N] int64 ground truth
    encoder: "SyntheticEncoder"  # frozen feature extractor (fine-tunable in stage 2)
    embeddings: Tensor  # [N, D] float32, encoder(raw), L2-normalised
    nouns: list[str]  # [W]
    noun_embeddings: Tensor  # [W, D] float32, L2-normalised
    spec: SyntheticSpec


def _unit(g: torch.Generator, *shape: int) -> Tensor:
    return nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


def _noise(g: torch.Generator, rows: int, dim: int, norm: float) -> Tensor:
    # per-coordinate std norm / sqrt(dim) gives noise vectors of norm ~ `norm`
    return torch.randn(rows, dim, generator=g) * (norm / dim**0.5)


def _class_sizes(spec: SyntheticSpec) -> np.ndarray:
    w = np.geomspace(1.0, 1.0 / spec.imbalance, spec.k)
    sizes = np.floor(w / w.sum() * spec.n).astype(int)
    sizes[: spec.n - sizes.sum()] += 1
    return sizes


class SyntheticEncoder(nn.Module):
    """E(x) = normalise(W x), W initialised to [I_D, 0]: the frozen-feature bottleneck."""

    def __init__(self, dim: int, in_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, dim, bias=False)
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.weight[:, :dim] = torch.eye(dim)
        self.proj.requires_grad_(False)
        self.view_noise = {"eval": 0.0, "weak": 0.02, "strong": 0.15}
        self.view_dropout = {"eval": 0.0, "weak": 0.0, "strong": 0.1}

    def image_features(self, x: Tensor) -> Tensor:
        return nn.functional.normalize(self.proj(x), dim=-1)

    forward = image_features

    def tail_parameters(self, n_blocks: int = 1) -> list[nn.Parameter]:
        self.proj.requires_grad_(True)
        return [self.proj.weight]

    def view_transform(self, kind: str) -> Callable[[Tensor], Tensor]:
        """Feature-space augmentations standing in for image crops and colour jitter."""
        if kind not in self.view_noise:
            raise ValueError(f"view kind must be one of {sorted(self.view_noise)}, got {kind!r}")
        sigma, drop = self.view_noise[kind], self.view_dropout[kind]

        def view(x: Tensor) -> Tensor:
            if sigma == 0 and drop == 0:
                return x
            out = x + sigma * x.norm() / x.shape[-1] ** 0.5 * torch.randn_like(x)
            if drop:
                out = out * (torch.rand_like(x) >= drop) / (1 - drop)
            return out

        return view


def make_synthetic(spec: Optional[SyntheticSpec] = None, seed: int = 0) -> SyntheticSet:
    """Draw a synthetic set (deterministic for a given spec and seed)."""
    spec = spec or SyntheticSpec()
    if spec.k < 2 or spec.n < spec.k:
        raise ValueError(f"need k >= 2 and n >= k, got k={spec.k}, n={spec.n}")
    g = torch.Generator().manual_seed(seed)
    d = spec.dim
    concepts = _unit(g, spec.k, d)
    hidden_concepts = _unit(g, spec.k, d)
    offsets = _unit(g, spec.k, spec.subclasses, d)
    styles = _unit(g, spec.styles, d)

    labels = np.repeat(np.arange(spec.k), _class_sizes(spec))
    lab = torch.from_numpy(labels)
    sub = torch.randint(spec.subclasses, (spec.n,), generator=g)
    sty = torch.randint(spec.styles, (spec.n,), generator=g)
    seen = (
        spec.class_scale * concepts[lab]
        + spec.subclass_scale * offsets[lab, sub]
        + spec.style_scale * styles[sty]
        + _noise(g, spec.n, d, spec.noise)
    )
    hidden = spec.hidden_scale * hidden_concepts[lab] + _noise(g, spec.n, d, spec.hidden_noise)
    perm = torch.randperm(spec.n, generator=g)
    raw = torch.cat([seen, hidden], dim=1)[perm]
    labels = labels[perm.numpy()]

    nouns, vecs = [], []
    for k in range(spec.k):
        for j in range(spec.nouns_per_class):
            nouns.append(f"class{k}-noun{j}")
            vecs.append(concepts[k] + _noise(g, 1, d, spec.noun_noise)[0])
    for s in range(spec.styles):
        for j in range(spec.nouns_per_style):
            nouns.append(f"style{s}-noun{j}")
            vecs.append(styles[s] + _noise(g, 1, d, spec.noun_noise)[0])
    for k in range(spec.k):
        for j in range(spec.subclasses):
            nouns.append(f"class{k}-part{j}")
            vecs.append(offsets[k, j] + _noise(g, 1, d, spec.noun_noise)[0])
    for j in range(spec.distractor_nouns):
        nouns.append(f"distractor{j}")
        vecs.append(_unit(g, d))
    noun_emb = nn.functional.normalize(torch.stack(vecs), dim=1)

    encoder = SyntheticEncoder(d, 2 * d)
    with torch.no_grad():
        emb = encoder.image_features(raw)
    return SyntheticSet(raw, labels.astype(np.int64), encoder, emb, nouns, noun_emb, spec)


# ---------------------------------------------------------------------------------------
# Realistic scenarios: CLIP's modality gap, nuisance stronger than class, hierarchies,
# long tails and many classes. See the module docstring for the table of knobs.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScenarioSpec:
    """The knobs of one named scenario (all norms are before the final L2-normalisation).

    Space: R^dim = span(mu_I, mu_T) (+) A (+) B, A of dim round(image_frac (dim - 2)) holds
    everything images vary in, B the rest (text-only semantics), so that in 64 dimensions
    random nouns align with images about as little as they do in CLIP's 512.

    Image x_seen = image_mean mu_I + class_scale m_k + subclass_scale o_kj
                   + style_scale w_i s_s + noise,     w_i ~ U[1 - style_jitter, 1 + style_jitter]
                   (m, o, s, noise in A)
    x_hidden     = hidden_scale h_k + hidden_noise    (read only by a fine-tuned encoder)
    noun t       = text_mean mu_T + noun_scale d + noun_noise (noise in A + B),
                   d = align e + sqrt(1 - align^2) r: e the image-side direction the noun
                   names (m_k; normalise(class_scale m_k + subclass_scale o_kj); s_s), r a
                   B direction shared by the synonyms of one concept; a distractor has
                   d = distractor_leak r_A + sqrt(1 - distractor_leak^2) r_B, both random.
    cos(mu_I, mu_T) = mean_cos.

    `generator="legacy"` (the "balanced" scenario) ignores the gap knobs and calls
    `make_synthetic` with the matching `SyntheticSpec` fields.
    """

    generator: str = "realistic"  # "realistic" or "legacy"
    n: int = 5000
    k: int = 10
    dim: int = 64
    subclasses: int = 3
    styles: int = 6
    image_frac: float = 0.65
    # image side
    image_mean: float = 2.6
    class_scale: float = 1.0
    subclass_scale: float = 0.8
    style_scale: float = 1.4
    style_jitter: float = 0.3
    noise: float = 1.5
    hidden_scale: float = 1.0
    hidden_noise: float = 0.8
    # text side
    text_mean: float = 1.7
    mean_cos: float = 0.4
    noun_scale: float = 1.0
    noun_align: float = 0.5
    style_noun_align: float = 0.3
    distractor_leak: float = 0.15
    noun_noise: float = 0.3
    nouns_per_class: int = 6
    nouns_per_subclass: int = 2
    nouns_per_style: int = 3
    distractor_nouns: int = 2000
    imbalance: float = 1.0  # largest / smallest class size

    def legacy_spec(self, n: Optional[int] = None) -> SyntheticSpec:
        """The `SyntheticSpec` a legacy scenario stands for."""
        return SyntheticSpec(
            n=self.n if n is None else n, k=self.k, dim=self.dim, subclasses=self.subclasses,
            styles=self.styles, class_scale=self.class_scale, subclass_scale=self.subclass_scale,
            style_scale=self.style_scale, noise=self.noise, hidden_scale=self.hidden_scale,
            hidden_noise=self.hidden_noise, nouns_per_class=self.nouns_per_class,
            nouns_per_style=self.nouns_per_style, noun_noise=self.noun_noise,
            distractor_nouns=self.distractor_nouns, imbalance=self.imbalance,
        )


def _balanced() -> ScenarioSpec:
    s = SyntheticSpec()
    return ScenarioSpec(
        generator="legacy", n=s.n, k=s.k, dim=s.dim, subclasses=s.subclasses, styles=s.styles,
        image_mean=0.0, class_scale=s.class_scale, subclass_scale=s.subclass_scale,
        style_scale=s.style_scale, style_jitter=0.0, noise=s.noise, hidden_scale=s.hidden_scale,
        hidden_noise=s.hidden_noise, text_mean=0.0, mean_cos=0.0, noun_scale=1.0, noun_align=1.0,
        style_noun_align=1.0, noun_noise=s.noun_noise, nouns_per_class=s.nouns_per_class,
        nouns_per_subclass=1, nouns_per_style=s.nouns_per_style,
        distractor_nouns=s.distractor_nouns, imbalance=s.imbalance,
    )


_GAP = ScenarioSpec()
SCENARIOS: dict[str, ScenarioSpec] = {
    "balanced": _balanced(),
    "gap": _GAP,
    "superclass": replace(
        _GAP, k=20, subclasses=4, class_scale=0.6, subclass_scale=1.1,
        nouns_per_class=0, nouns_per_subclass=3,
    ),
    "longtail10": replace(_GAP, imbalance=10.0),
    "longtail100": replace(_GAP, imbalance=100.0),
    "k100": replace(_GAP, n=10000, k=100),
    "k200": replace(_GAP, n=20000, k=200),
}


def _scenario_seed(name: str, seed: int) -> int:
    # stable across runs and Python versions (unlike hash()); scenarios never share draws
    return (zlib.crc32(name.encode()) * 1_000_003 + int(seed)) % (2**63 - 1)


def _in(g: torch.Generator, basis: Tensor, *shape: int) -> Tensor:
    """Random unit vectors in the span of the (orthonormal) rows of `basis`."""
    return nn.functional.normalize(torch.randn(*shape, basis.shape[0], generator=g) @ basis, dim=-1)


def make_scenario(name: str, seed: int = 0, n: Optional[int] = None, dim: Optional[int] = None) -> SyntheticSet:
    """Draw one named scenario (see `SCENARIOS` and the module docstring).

    Args:
        name: a key of `SCENARIOS`.
        seed: deterministic for (name, seed); "balanced" with seed s is exactly
            `make_synthetic(SyntheticSpec(), seed=s)` (with `n`/`dim` overridden if given).
        n: images (default: the scenario's n); dim: feature dim (default 64).
    Returns:
        SyntheticSet whose `spec` is the scenario's ScenarioSpec with n/dim filled in
        (the SyntheticSpec for "balanced").
    """
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose one of {sorted(SCENARIOS)}")
    spec = SCENARIOS[name]
    spec = replace(spec, n=spec.n if n is None else int(n), dim=spec.dim if dim is None else int(dim))
    if spec.generator == "legacy":
        return make_synthetic(spec.legacy_spec(), seed=seed)
    return _make_realistic(spec, _scenario_seed(name, seed))


def _make_realistic(spec: ScenarioSpec, seed: int) -> SyntheticSet:
    if spec.k < 2 or spec.n < spec.k:
        raise ValueError(f"need k >= 2 and n >= k, got k={spec.k}, n={spec.n}")
    d = spec.dim
    d_a = int(round(spec.image_frac * (d - 2)))
    if d < 8 or not 2 <= d_a <= d - 4:
        raise ValueError(f"need dim >= 8 and 2 <= image dims <= dim - 4, got dim={d}, image dims={d_a}")
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q = q.T.float()  # rows: an orthonormal basis of R^d
    mu_i = q[0]
    mu_t = spec.mean_cos * q[0] + (1.0 - spec.mean_cos**2) ** 0.5 * q[1]
    img_b, txt_b = q[2 : 2 + d_a], q[2 + d_a :]  # A (images vary here) and B (text only)
    concepts = _in(g, img_b, spec.k)
    offsets = _in(g, img_b, spec.k, spec.subclasses)
    styles = _in(g, img_b, spec.styles)
    hidden_concepts = _unit(g, spec.k, d)

    sizes = _class_sizes(spec)  # duck-typed: uses n, k, imbalance
    labels = np.repeat(np.arange(spec.k), sizes)
    lab = torch.from_numpy(labels)
    sub = torch.randint(spec.subclasses, (spec.n,), generator=g)
    sty = torch.randint(spec.styles, (spec.n,), generator=g)
    w = 1.0 + spec.style_jitter * (2.0 * torch.rand(spec.n, 1, generator=g) - 1.0)
    seen = (
        spec.image_mean * mu_i
        + spec.class_scale * concepts[lab]
        + spec.subclass_scale * offsets[lab, sub]
        + spec.style_scale * w * styles[sty]
        + _noise(g, spec.n, d_a, spec.noise) @ img_b
    )
    hidden = spec.hidden_scale * hidden_concepts[lab] + _noise(g, spec.n, d, spec.hidden_noise)
    perm = torch.randperm(spec.n, generator=g)
    raw = torch.cat([seen, hidden], dim=1)[perm]
    labels = labels[perm.numpy()]

    # image-side directions the nouns name; a sub-class looks like class + offset
    sub_dirs = nn.functional.normalize(
        spec.class_scale * concepts[:, None] + spec.subclass_scale * offsets, dim=-1
    )

    # text-only parts: a sub-class's mixes its class's the way its image direction does
    r_class = _in(g, txt_b, spec.k)
    r_sub = nn.functional.normalize(
        spec.class_scale * r_class[:, None] + spec.subclass_scale * _in(g, txt_b, spec.k, spec.subclasses), dim=-1
    )
    r_style = _in(g, txt_b, spec.styles)
    a, a_s = spec.noun_align, spec.style_noun_align
    class_txt = a * concepts + (1.0 - a**2) ** 0.5 * r_class
    sub_txt = a * sub_dirs + (1.0 - a**2) ** 0.5 * r_sub
    style_txt = a_s * styles + (1.0 - a_s**2) ** 0.5 * r_style
    leak = spec.distractor_leak
    distract = leak * _in(g, img_b, spec.distractor_nouns) + (1.0 - leak**2) ** 0.5 * _in(g, txt_b, spec.distractor_nouns)

    names: list[str] = []
    dirs: list[Tensor] = []
    for k in range(spec.k):
        for j in range(spec.nouns_per_class):
            names.append(f"class{k}-noun{j}")
            dirs.append(class_txt[k])
        for s in range(spec.subclasses):
            for j in range(spec.nouns_per_subclass):
                names.append(f"class{k}-sub{s}-noun{j}")
                dirs.append(sub_txt[k, s])
    for s in range(spec.styles):
        for j in range(spec.nouns_per_style):
            names.append(f"style{s}-noun{j}")
            dirs.append(style_txt[s])
    names += [f"distractor{j}" for j in range(spec.distractor_nouns)]
    dirs_t = torch.cat([torch.stack(dirs), distract]) if dirs else distract
    noise = _noise(g, len(names), d - 2, spec.noun_noise) @ q[2:]
    noun_emb = nn.functional.normalize(spec.text_mean * mu_t + spec.noun_scale * dirs_t + noise, dim=1)

    encoder = SyntheticEncoder(d, 2 * d)
    with torch.no_grad():
        emb = encoder.image_features(raw)
    return SyntheticSet(raw, labels.astype(np.int64), encoder, emb, names, noun_emb, spec)
