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

`make_synthetic` returns everything a run needs; `SyntheticEncoder` implements the small
tunable-encoder interface that `stage2` uses for CLIP towers too, and
`semclust.data.TensorSource(raw)` serves the raw rows as the "images".
"""

from __future__ import annotations

from dataclasses import dataclass
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
