"""TAC baselines: Li et al., "Image Clustering with External Guidance" (ICML 2024).

Written from the paper and from the documented behaviour of the official code
(XLearning-SCU/2024-ICML-TAC), on top of `semclust.ops`:

* **Counterparts** (`tac_counterparts`, TAC's ``filter_nouns.py`` + ``retrieve_text.py``):
  k-means on the image features with M = max(K, N // 300) centres (TAC: N / 300, e.g.
  167 centres for CIFAR-10's 50 000 images); each noun votes for its nearest centre
  with confidence max_m softmax_m(t . c_m) (temperature 1, a softmax over the centres);
  each centre keeps the `per_centre` = 5 nouns of highest confidence among its voters;
  the text counterpart of image i is v_i = normalise(sum_w softmax_w(u_i . t_w / 0.005) t_w)
  over the kept nouns.
* **Training-free TAC** (`tac_training_free`, TAC's ``concat_kmeans.py``): spherical
  k-means on [normalise(u) || normalise(v)].
* **TAC heads** (`train_tac_heads`, TAC's ``train_head.py``): two cluster heads
  Linear(D, H)-BatchNorm-ReLU-Linear(H, K)-softmax (weights trunc-normal, std 0.02), f on
  images u, g on counterparts v. Per batch of anchors i with one random image neighbour
  a(i) (among the image kNN) and one random text neighbour b(i) (among the text kNN):

      P = f(u_i), Q = g(v_i), P' = f(u_a(i)), Q' = g(v_b(i))        ([B, K] each)
      L = D(P, Q') + D(Q, P') + BCE(<p_i, q_i>, 1) - w (H(mean P) + H(mean Q))

  where D(A, B) is the cluster-level InfoNCE at temperature tau between the K columns of
  A and the K columns of B (column k of A positive with column k of B, the other 2K - 2
  columns negative, both directions, i.e. CE summed over the 2K columns / 2K), and
  H(p) = -sum_k p_k log p_k (with p clamped at 1e-9). Adam(lr, betas = (0.9, 0.99)).
  Prediction: argmax of the **image head** f(u) in eval mode (TAC's ``infer`` runs the
  image head only; the text head is a training aid). ``predict="mean"`` averages the two
  heads' probabilities instead.

Settings (`tac_settings`): TAC uses epochs 20, batch 512, tau 0.5 for its small-K data
sets (K <= 47: CIFAR-10/20, STL-10, ImageNet-10/Dogs, DTD) and epochs 100, batch 8192,
tau 5.0 for UCF101 (K = 101) and ImageNet-1K. The rule here is the one TAC's code
implies: K >= 100 gets the large settings. Batches larger than N are clipped to N.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .. import ops
from ..ops.reference import cluster_infonce
from ..config import CounterpartConfig, SemanticSpaceConfig
from .counterparts import select_nouns, text_counterparts
from .heads import Heads

__all__ = [
    "TacCounterparts", "tac_counterparts", "tac_neighbours", "tac_training_free",
    "tac_settings", "fit_tac_heads", "train_tac_heads",
]

LARGE_K = 100  # K at and above which TAC's large-K settings apply (see module docstring)


class TacCounterparts(NamedTuple):
    v: Tensor  # [N, D] float32, L2-normalised text counterparts
    selected: Tensor  # [S] int64 indices into the noun bank of the kept nouns
    centres: int  # M, the number of image k-means centres used for the noun vote


def _unit_rows(name: str, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] matrix, got shape {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} has non-finite values")
    return ops.normalize_rows(x, torch.float32)


def _check_k(k: int, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an int, got {k!r}")
    if not 2 <= int(k) <= n:
        raise ValueError(f"k must be in [2, N={n}], got {k}")
    return int(k)


def tac_settings(k: int) -> dict:
    """TAC's head-training hyper-parameters for K clusters.

    K < 100: epochs 20, batch 512, tau 0.5 (TAC's CIFAR/STL/ImageNet-10/Dogs/DTD runs);
    K >= 100: epochs 100, batch 8192, tau 5.0 (TAC's UCF101 and ImageNet-1K runs).
    The other settings are the same for both: lr 1e-3 (Adam), entropy weight 5, 50 kNN.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ValueError(f"k must be an int >= 2, got {k!r}")
    large = k >= LARGE_K
    return {
        "epochs": 100 if large else 20,
        "batch_size": 8192 if large else 512,
        "tau": 5.0 if large else 0.5,
        "lr": 1e-3,
        "entropy_weight": 5.0,
        "neighbours": 50,
    }


def tac_neighbours(z: Tensor, m: int = 50) -> Tensor:
    """[N, m] int64 indices of each row's m nearest other rows (cosine), best first."""
    z = _unit_rows("z", z)
    if not 1 <= m < z.shape[0]:
        raise ValueError(f"m must be in [1, N-1={z.shape[0] - 1}], got {m}")
    return ops.knn(z, m)[1]


def tac_counterparts(
    u: Tensor,
    noun_embeddings: Tensor,
    k: int,
    *,
    centres: Optional[int] = None,
    per_centre: int = 5,
    tau: float = 0.005,
    seed: int = 0,
    kmeans_restarts: int = 3,
) -> TacCounterparts:
    """TAC's text counterparts: noun filtering by an image k-means vote, then retrieval.

    Args:
        u: [N, D] image features; noun_embeddings: [W, D] noun features (the vocabulary).
        k: the number of clusters sought (only sets the default M = max(k, N // 300)).
        centres: M, overriding the default; per_centre: nouns kept per centre (TAC: 5).
        tau: retrieval temperature (TAC: 0.005).
    Returns:
        TacCounterparts(v [N, D] normalised, selected noun indices, M).
    """
    u = _unit_rows("u", u)
    t = _unit_rows("noun_embeddings", noun_embeddings)
    if t.shape[1] != u.shape[1]:
        raise ValueError(f"noun_embeddings has dim {t.shape[1]} but u has dim {u.shape[1]}")
    n = u.shape[0]
    k = _check_k(k, n)
    m = max(k, n // 300) if centres is None else int(centres)
    if not 1 <= m <= n:
        raise ValueError(f"centres must be in [1, N={n}], got {m}")
    if per_centre < 1:
        raise ValueError(f"per_centre must be >= 1, got {per_centre}")
    # semclust's "tac" recipe with TAC's settings: exactly M centres (asked for as K, with
    # images_per_centre > N so that N // images_per_centre adds none), the vote at
    # temperature 1, retrieval over every kept noun
    space_cfg = SemanticSpaceConfig(method="tac", images_per_centre=n + 1, nouns_per_centre=per_centre,
                                    noun_tau=1.0, kmeans_restarts=kmeans_restarts)
    t = t.to(u.device)
    space = select_nouns(u, t, m, space_cfg, seed=seed)
    v = text_counterparts(u, space.bank(t), CounterpartConfig(tau=tau, per_image=0)).float()
    return TacCounterparts(v, space.noun_index, int(space.centers.shape[0]))


def tac_training_free(u: Tensor, v: Tensor, k: int, seed: int = 0, restarts: int = 10) -> np.ndarray:
    """TAC without training: spherical k-means on [normalise(u) || normalise(v)].

    Returns:
        [N] int64 cluster labels (numpy).
    """
    u = _unit_rows("u", u)
    v = _unit_rows("v", v)
    if v.shape != u.shape:
        raise ValueError(f"u and v must have the same shape, got {tuple(u.shape)} and {tuple(v.shape)}")
    k = _check_k(k, u.shape[0])
    z = torch.cat([u, v.to(u.device)], dim=1)
    return ops.kmeans(z, k, seed=seed, restarts=restarts, iters=300).labels.cpu().numpy()


def _entropy_of_mean(p: Tensor) -> Tensor:
    m = p.mean(0).clamp_min(1e-9)
    return -(m * m.log()).sum()


def _consistency(p: Tensor, q: Tensor) -> Tensor:
    # BCE(<p_i, q_i>, 1) = -mean_i log <p_i, q_i>; BCE clamps the log at -100 like torch's
    s = (p * q).sum(1).clamp(0.0, 1.0)
    return nn.functional.binary_cross_entropy(s, torch.ones_like(s))


def _check_neighbours(name: str, idx: Tensor, n: int) -> Tensor:
    if not isinstance(idx, Tensor):
        idx = torch.as_tensor(np.asarray(idx))
    if idx.ndim != 2 or idx.shape[0] != n or idx.shape[1] < 1:
        raise ValueError(f"{name} must be [N={n}, m>=1] indices, got shape {tuple(idx.shape)}")
    if torch.is_floating_point(idx) or idx.dtype == torch.bool:
        raise ValueError(f"{name} must be integer indices, got {idx.dtype}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"{name} has indices outside [0, {n})")
    return idx.long()


def fit_tac_heads(
    u: Tensor,
    v: Tensor,
    k: int,
    image_neighbours: Tensor,
    text_neighbours: Tensor,
    *,
    epochs: int = 20,
    batch_size: int = 512,
    lr: float = 1e-3,
    tau: float = 0.5,
    entropy_weight: float = 5.0,
    hidden: int = 512,
    seed: int = 0,
) -> tuple[Heads, list[dict]]:
    """Train TAC's cluster heads (see the module docstring for the losses); `train_tac_heads` predicts too.

    Args:
        u: [N, D] image features; v: [N, D] their text counterparts (normalised here).
        k: clusters, 2 <= k <= N.
        image_neighbours / text_neighbours: [N, m] int indices of each row's nearest
            neighbours among u / among v (e.g. `tac_neighbours(u, 50)`); each step draws
            one of the m at random per anchor, as TAC does.
        epochs, batch_size (clipped to N; the last incomplete batch is dropped), lr, tau
            (distillation temperature), entropy_weight, hidden: see `tac_settings(k)`.
        seed: the heads' initialisation, the shuffling and the neighbour draws.
    Returns:
        (the heads in eval mode, history: one dict per epoch with the mean "distill",
        "consist", "entropy" and "loss").
    """
    u = _unit_rows("u", u)
    v = _unit_rows("v", v)
    if v.shape != u.shape:
        raise ValueError(f"u and v must have the same shape, got {tuple(u.shape)} and {tuple(v.shape)}")
    n, d = u.shape
    k = _check_k(k, n)
    nb_img = _check_neighbours("image_neighbours", image_neighbours, n).to(u.device)
    nb_txt = _check_neighbours("text_neighbours", text_neighbours, n).to(u.device)
    if epochs < 1 or batch_size < 2 or hidden < 1:
        raise ValueError(f"need epochs >= 1, batch_size >= 2, hidden >= 1; got {epochs}, {batch_size}, {hidden}")
    if not (lr > 0 and tau > 0 and entropy_weight >= 0):
        raise ValueError(f"need lr > 0, tau > 0, entropy_weight >= 0; got {lr}, {tau}, {entropy_weight}")
    v = v.to(u.device)
    bs = min(batch_size, n)

    devices = [u.device] if u.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = Heads(d, k, hidden).to(u.device)  # TAC's heads and init
    gen = torch.Generator(device="cpu").manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99), fused=True)  # as stage 1's
    history = []
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen).to(u.device)
        pick_i = torch.randint(nb_img.shape[1], (n,), generator=gen).to(u.device)
        pick_t = torch.randint(nb_txt.shape[1], (n,), generator=gen).to(u.device)
        sums = {"distill": 0.0, "consist": 0.0, "entropy": 0.0, "loss": 0.0}
        steps = n // bs
        for s in range(steps):
            idx = perm[s * bs : (s + 1) * bs]
            ni = nb_img[idx, pick_i[idx]]
            nt = nb_txt[idx, pick_t[idx]]
            p, q = (torch.softmax(z, 1) for z in model(u[idx], v[idx]))
            p_nb, q_nb = (torch.softmax(z, 1) for z in model(u[ni], v[nt]))
            distill = cluster_infonce(p, q_nb, tau) + cluster_infonce(q, p_nb, tau)
            consist = _consistency(q, p)
            ent = _entropy_of_mean(q) + _entropy_of_mean(p)
            loss = distill + consist - entropy_weight * ent
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for name, val in (("distill", distill), ("consist", consist), ("entropy", ent), ("loss", loss)):
                sums[name] += float(val.detach())
        history.append({"epoch": epoch + 1, **{key: val / steps for key, val in sums.items()}})

    model.eval()
    return model, history


def train_tac_heads(
    u: Tensor,
    v: Tensor,
    k: int,
    image_neighbours: Tensor,
    text_neighbours: Tensor,
    *,
    predict: str = "image",
    **settings,
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Train TAC's cluster heads (`fit_tac_heads`, whose keyword `settings` it takes) and
    predict every row.

    predict: "image" (TAC: the image head) or "mean" (mean of both heads' probs).
    Returns:
        (labels [N] int64, confidences [N] float32 (the max probability), history).
    """
    if predict not in ("image", "mean"):
        raise ValueError(f"predict must be 'image' or 'mean', got {predict!r}")
    model, history = fit_tac_heads(u, v, k, image_neighbours, text_neighbours, **settings)
    u = _unit_rows("u", u)
    labels, conf = model.predict(u, _unit_rows("v", v).to(u.device) if predict == "mean" else None, chunk_size=8192)
    return labels.cpu().numpy().astype(np.int64), conf.float().cpu().numpy(), history
