"""Stage 1: cross-modal semantic consistency training of the two heads.

The CLIP features stay frozen: the heads f_I (images u) and f_T (text counterparts v)
learn from instance-, assignment- and centre-level consistency between the modalities
and their cross-modal neighbours, while the balancing regularizer keeps every cluster
alive. See `semclust.losses` for the terms.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import fused_step as fused
from . import losses, ops
from .config import ChunkConfig, Stage1Config
from .heads import Heads

log = logging.getLogger(__name__)


@dataclass
class Stage1Result:
    heads: Heads
    labels: Tensor  # [N] int64 fused prediction
    conf: Tensor  # [N] its probability
    history: list[dict] = field(default_factory=list)


def neighbours(z: Tensor, k: int, chunks: ChunkConfig) -> Tensor:
    """[N, k] indices of each row's k nearest other rows (cosine)."""
    return ops.knn(z, k, exclude_self=True, query_chunk=chunks.knn_queries, database_chunk=chunks.knn_database)[1]


def _batches(n: int, size: int, g: torch.Generator) -> list[Tensor]:
    perm = torch.randperm(n, generator=g)
    out = list(perm.split(size))
    # BatchNorm cannot normalise a batch of one: fold a lone last row into the previous batch
    if len(out) > 1 and out[-1].numel() < 2:
        out[-2] = torch.cat([out[-2], out.pop()])
    return out


def train_stage1(
    u: Tensor,
    v: Tensor,
    k: int,
    cfg: Stage1Config = Stage1Config(),
    seed: int = 0,
    chunks: ChunkConfig = ChunkConfig(),
    progress: bool = True,
    image_neighbours: Optional[Tensor] = None,
    text_neighbours: Optional[Tensor] = None,
) -> Stage1Result:
    """Train the heads on images u [N, D] and counterparts v [N, D] (same device).

    Neighbour lists [N, knn_k] are computed with `ops.knn` unless given.
    Returns the heads (eval mode), the fused labels/confidences and per-epoch history.
    """
    n, d = u.shape
    if n < 2:
        raise ValueError("stage 1 needs at least 2 samples")
    device = u.device
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    kk = min(cfg.knn_k, n - 1)
    ni = image_neighbours if image_neighbours is not None else neighbours(u, kk, chunks)
    nt = text_neighbours if text_neighbours is not None else neighbours(v, kk, chunks)
    heads = Heads(d, k, cfg.hidden).to(device)
    opt = torch.optim.Adam(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = losses.BalanceState.uniform(k, cfg.balance_momentum, cfg.balance_power, device) if cfg.balance == "dynamic" else None
    w_bal = cfg.w_balance if cfg.balance == "dynamic" else cfg.balance_fixed_weight
    centers: Optional[Tensor] = None
    history = []
    # the ext backend computes the whole loss and its logit gradients in one fused call
    use_fused = fused.active(device)
    bar = tqdm(range(cfg.epochs), desc="stage 1", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        heads.train()
        t0, sums, steps = time.perf_counter(), {}, 0
        for idx in _batches(n, min(cfg.batch_size, n), g):
            b = idx.numel()
            # one random neighbour per sample, drawn from the other modality's lists
            jt = nt[idx, torch.randint(nt.shape[1], (b,), generator=g)]
            ji = ni[idx, torch.randint(ni.shape[1], (b,), generator=g)]
            idx, jt, ji = idx.to(device), jt.to(device), ji.to(device)
            ub, vb = u[idx].float(), v[idx].float()
            logits_i = heads.image(torch.cat([ub, u[ji].float()]))
            logits_t = heads.text(torch.cat([vb, v[jt].float()]))
            if use_fused:
                res = fused.fused_step(
                    logits_i, logits_t, ub, vb, centers if cfg.center_target else None,
                    state.weights() if state is not None else None, cluster_tau=cfg.cluster_tau,
                    center_tau=cfg.center_tau, w_instance=cfg.w_instance, w_assignment=cfg.w_assignment,
                    w_center=cfg.w_center, w_balance=w_bal,
                )
                if state is not None:
                    state.update(res.marginal)
                p, q = res.probs_i[:b], res.probs_t[:b]
                parts, loss = {name: getattr(res, name) for name in fused.PARTS}, res.loss
            else:
                p, p_n = torch.softmax(logits_i, 1).split(b)
                q, q_n = torch.softmax(logits_t, 1).split(b)
                parts = {
                    "instance": losses.instance_loss(p, q, p_n, q_n),
                    "assignment": losses.assignment_loss(p, q, p_n, q_n, cfg.cluster_tau),
                    "center": losses.center_loss(p, q, ub, vb, centers if cfg.center_target else None, cfg.cluster_tau, cfg.center_tau),
                    "balance": losses.balance_loss(p, q, state),
                }
                loss = (
                    cfg.w_instance * parts["instance"]
                    + cfg.w_assignment * parts["assignment"]
                    + cfg.w_center * parts["center"]
                    + w_bal * parts["balance"]
                )
            if not torch.isfinite(loss):
                raise FloatingPointError(f"stage 1 loss became {float(loss)} at epoch {epoch}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            centers = losses.update_centers(centers, p.detach(), q.detach(), ub, vb, cfg.center_momentum)
            for name, val in {**parts, "total": loss}.items():
                sums[name] = sums.get(name, 0.0) + float(val.detach())
            steps += 1
        row = {"epoch": epoch, **{k_: s / steps for k_, s in sums.items()}, "seconds": time.perf_counter() - t0}
        history.append(row)
        bar.set_postfix(loss=f"{row['total']:.3f}")
    heads.eval()
    labels, conf = heads.predict(u, v if cfg.predict_with == "both" else None, chunk_size=chunks.assign)
    return Stage1Result(heads, labels, conf, history)
