"""Stage 1: cross-modal semantic consistency training of the two heads.

The CLIP features stay frozen: the heads f_I (images u) and f_T (text counterparts v)
learn from instance-, assignment- and centre-level consistency between the modalities
and their cross-modal neighbours, while the balancing regularizer keeps every cluster
alive. See `semclust.losses` for the terms.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import fused_step as fused
from . import losses, ops
from ._io import atomic_write
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


def _run_signature(u: Tensor, k: int, seed: int, cfg: Stage1Config) -> str:
    """What a checkpoint must match to be resumed: the data (a strided sample of rows),
    K, the seed and every setting but the number of epochs (training may be extended)."""
    settings = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "epochs"}
    sample = u[:: max(1, u.shape[0] // 1024)].detach().float().cpu().contiguous().numpy().tobytes()
    head = json.dumps({"n": u.shape[0], "d": u.shape[1], "k": k, "seed": seed, "cfg": settings}, sort_keys=True)
    return hashlib.sha256(head.encode() + sample).hexdigest()


def _load_checkpoint(path: Path, run_id: str) -> dict:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is reported the same way, with its cause
        raise ValueError(f"cannot resume: {path} is not a readable stage-1 checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ck, dict) or ck.get("run") != run_id:
        raise ValueError(f"cannot resume: {path} was written by another run (other data, K, seed or settings); "
                         "delete it or start without resume")
    return ck


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
    checkpoint: Optional[Union[str, Path]] = None,
    resume: bool = False,
) -> Stage1Result:
    """Train the heads on images u [N, D] and counterparts v [N, D] (same device).

    Neighbour lists [N, knn_k] are computed with `ops.knn` unless given.
    With `checkpoint`, the whole training state (heads, optimiser, sampling RNG, EMA
    centres and shares, history) is written there atomically after every epoch; with
    `resume` too, a checkpoint of the same run (same data fingerprint, K, seed and
    settings but the epoch count) is continued, ending exactly where an uninterrupted run
    ends. Returns the heads (eval mode), the labels/confidences and per-epoch history.
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
    run_id = _run_signature(u, k, seed, cfg)
    start = 0
    if checkpoint is not None and resume and Path(checkpoint).exists():
        ck = _load_checkpoint(Path(checkpoint), run_id)
        heads.load_state_dict(ck["heads"])
        opt.load_state_dict(ck["opt"])
        g.set_state(ck["rng"])
        centers = None if ck["centers"] is None else ck["centers"].to(device)
        if state is not None:
            state.shares = ck["shares"].to(device)
        history, start = ck["history"], ck["epoch"] + 1
        log.info("stage 1 resumes after epoch %d from %s", ck["epoch"], checkpoint)
    bar = tqdm(range(start, cfg.epochs), desc="stage 1", unit="epoch", disable=not progress, leave=False,
               initial=start, total=cfg.epochs)
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
        if checkpoint is not None:
            payload = {"run": run_id, "epoch": epoch, "heads": heads.state_dict(), "opt": opt.state_dict(),
                       "rng": g.get_state(), "centers": centers, "history": history,
                       "shares": state.shares if state is not None else None}
            atomic_write(Path(checkpoint), lambda f: torch.save(payload, f))
    heads.eval()
    labels, conf = heads.predict(u, v if cfg.predict_with == "both" else None, chunk_size=chunks.assign)
    return Stage1Result(heads, labels, conf, history)
