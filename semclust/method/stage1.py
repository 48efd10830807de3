"""Stage 1: cross-modal semantic consistency training of the two heads.

The CLIP features stay frozen: the heads f_I (images u) and f_T (text counterparts v)
learn from instance-, assignment- and centre-level consistency between the modalities
and their cross-modal neighbours, while the balancing regularizer keeps every cluster
alive. The loss is `semclust.ops.reference.stage1_loss` (the torch path) or the fused
`semclust.ops.fused_step` (the ext backend: one call for the loss and its logit gradients).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..config import ChunkConfig, Stage1Config
from ..ops import fused_step
from ..ops import dispatch
from ..ops.dispatch import BackendUnavailable
from ..ops.fused_step import active as fused_step_active
from ..ops.reference import PARTS, stage1_loss
from ..runtime import distributed as dist
from ..runtime.files import atomic_write, load_checkpoint
from ..runtime.mmap import fingerprint, release
from ..runtime.prefetch import prefetch
from . import losses, tac
from .heads import Heads

log = logging.getLogger(__name__)


@dataclass
class Stage1Result:
    heads: Heads
    labels: Tensor  # [N] int64 fused prediction
    conf: Tensor  # [N] its probability
    history: list[dict] = field(default_factory=list)


def _run_signature(data: str, k: int, seed: int, cfg: Stage1Config) -> str:
    """What a checkpoint must match to be resumed: the data (`data`: what identifies u),
    K, the seed and every setting but those of the number of epochs (training may be
    extended)."""
    settings = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("epochs", "cluster_visits")}
    head = json.dumps({"k": k, "seed": seed, "cfg": settings, "data": data}, sort_keys=True)
    return hashlib.sha256(head.encode()).hexdigest()


# fewer epochs than this under-train even with many rows per cluster (k200 at 100k rows:
# ACC 0.40 after 1 epoch, 0.55 after 4)
_MIN_LARGE_K_EPOCHS = 4


def stage1_epochs(cfg: Stage1Config, n: int, k: int) -> int:
    """The epochs stage 1 trains for N rows and K clusters: `cfg.epochs`, or at K >= 100
    with `cfg.cluster_visits` about that many visits of each cluster's rows,
    max(4, ceil(cluster_visits K / N)), at most `cfg.epochs` (see `Stage1Config`)."""
    if not cfg.cluster_visits or k < tac.LARGE_K:
        return cfg.epochs
    return min(cfg.epochs, max(_MIN_LARGE_K_EPOCHS, -(-cfg.cluster_visits * k // n)))


def _batches(n: int, size: int, g: torch.Generator) -> list[Tensor]:
    perm = torch.randperm(n, generator=g)
    out = list(perm.split(size))
    # BatchNorm cannot normalise a batch of one: fold a lone last row into the previous batch
    if len(out) > 1 and out[-1].numel() < 2:
        last = out.pop()  # popped first: out[-2] must name the batch before it, not after
        out[-1] = torch.cat([out[-1], last])
    return out


def _epoch_plan(ni: Tensor, nt: Tensor, n: int, batch_size: int, g: torch.Generator) -> list[tuple[Tensor, Tensor, Tensor]]:
    """One epoch's (idx, ji, jt) per batch: its rows and one random image / text
    neighbour of each. Every draw is made here, in order, on the caller's thread, so the
    sampling stays deterministic and resumable whichever thread gathers the rows."""
    plan = []
    for idx in _batches(n, min(batch_size, n), g):
        b = idx.numel()
        # one random neighbour per sample, drawn from the other modality's lists
        jt = nt[idx, torch.randint(nt.shape[1], (b,), generator=g)].long()
        ji = ni[idx, torch.randint(ni.shape[1], (b,), generator=g)].long()
        plan.append((idx, ji, jt))
    return plan


def _gather(u: Tensor, v: Tensor, plan: list[tuple[Tensor, Tensor, Tensor]], device: torch.device) -> Iterator[tuple[Tensor, ...]]:
    """(idx, x_i = [u[idx]; u[ji]], x_t = [v[idx]; v[jt]]) per planned batch, float32 on
    `device`: the heads' inputs, the batch's rows first. From a memory-mapped store this is
    page faults and fp16 conversion, the part `prefetch` overlaps; one gather per modality
    there spares the training thread two [2B, D] concatenations a step."""

    def rows(t: Tensor, i: Tensor) -> Tensor:
        return t[i.to(t.device)].to(device=device, dtype=torch.float32)

    for idx, ji, jt in plan:
        yield idx, rows(u, torch.cat([idx, ji])), rows(v, torch.cat([idx, jt]))


def _train_tac(u: Tensor, v: Tensor, k: int, ni: Tensor, nt: Tensor, cfg: Stage1Config, seed: int,
               chunks: ChunkConfig) -> Stage1Result:
    """Stage 1 with TAC's objective and TAC's settings for K (a baseline, one process; it
    holds u and v in float32 and takes seconds, so it is not checkpointed)."""
    if dist.rank_world()[1] > 1:
        raise ValueError("Stage1Config(objective='tac') runs in one process; use objective='semclust' with torch.distributed")
    st = tac.tac_settings(k)
    heads, history = tac.fit_tac_heads(u, v, k, ni, nt, epochs=st["epochs"], batch_size=st["batch_size"], lr=st["lr"],
                                       tau=st["tau"], entropy_weight=st["entropy_weight"], hidden=cfg.hidden, seed=seed)
    labels, conf = heads.predict(u.float(), v.float() if cfg.predict_with == "both" else None, chunk_size=chunks.assign)
    return Stage1Result(heads, labels, conf, history)


def train_stage1(
    u: Tensor,
    v: Tensor,
    k: int,
    image_neighbours: Tensor,
    text_neighbours: Tensor,
    cfg: Optional[Stage1Config] = None,
    *,
    seed: int = 0,
    chunks: Optional[ChunkConfig] = None,
    progress: bool = True,
    checkpoint: Optional[Union[str, Path]] = None,
    resume: bool = False,
    data_key: Optional[str] = None,
) -> Stage1Result:
    """Train the heads on images u [N, D] and counterparts v [N, D] (same device).

    `image_neighbours` / `text_neighbours` [N, m] are each row's nearest other rows in
    image and in counterpart space (`method.neighbours.knn_lists`).
    With `checkpoint`, the whole training state (heads, optimiser, sampling RNG, EMA
    centres and shares, history) is written there atomically after every epoch; with
    `resume` too, a checkpoint of the same run (same data fingerprint, K, seed and
    settings but the epoch count) is continued, ending exactly where an uninterrupted run
    ends. `data_key` identifies the data in that match where the caller already has such
    a fingerprint (the fit passes its workspace's run id, which covers every byte of the
    rows); None: every byte of u is hashed (`runtime.mmap.fingerprint`), which at 1M x 512
    reads 1 GB once more. Without `checkpoint` nothing is hashed.
    Returns the heads (eval mode), the labels/confidences and per-epoch history.
    """
    cfg, chunks = cfg or Stage1Config(), chunks or ChunkConfig()
    n, d = u.shape
    if n < 2:
        raise ValueError("stage 1 needs at least 2 samples")
    if cfg.objective == "tac":
        return _train_tac(u, v, k, image_neighbours, text_neighbours, cfg, seed, chunks)
    device = u.device
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    ni, nt = image_neighbours, text_neighbours
    heads = Heads(d, k, cfg.hidden).to(device)
    rank, world = dist.rank_world()
    model: torch.nn.Module = heads
    if world > 1:
        # data-parallel: each rank takes its slice of every global batch; the batch-level
        # losses see the whole batch (gathered) and BatchNorm its global statistics, so
        # the step is the single-process step up to summation order
        if min(cfg.batch_size, n) < 2 * world:
            raise ValueError(f"batch_size {min(cfg.batch_size, n)} is too small for {world} ranks (needs >= {2 * world})")
        dist.use_global_batchnorm(heads)
        model = torch.nn.parallel.DistributedDataParallel(heads, broadcast_buffers=False)
    # fused: one kernel for all parameters (0.7 ms a step against 3.1 ms for the two heads at
    # K <= 100 on one CPU thread), the same update as the default implementation
    opt = torch.optim.Adam(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    state = losses.BalancePrior.uniform(k, cfg.balance_momentum, cfg.balance_mix, device) if cfg.balance == "dynamic" else None
    centers: Optional[Tensor] = None
    center_tau: Optional[float] = None
    history = []
    # K above cfg.cluster_columns: the cluster-level terms compare a random subset of
    # clusters each step, which the fused step does not do. The torch step with the subset
    # is the faster one there (B = 512, K = 1000, one thread: 307 ms against 701 ms for
    # the fused step over all K and 1058 ms for the torch one; `semclust bench step`)
    subset = 0 < cfg.cluster_columns < k
    if subset and dispatch.forced() == "ext":
        raise BackendUnavailable(
            f"backend 'ext' was forced, but its fused step compares all K = {k} clusters and "
            f"stage1.cluster_columns = {cfg.cluster_columns} asks for a random subset of them each step: "
            "set stage1.cluster_columns = 0 (every cluster) or do not force the backend")
    # the ext backend computes the whole loss and its logit gradients in one fused call
    use_fused = not subset and fused_step_active(device) and world == 1
    run_id = None
    if checkpoint is not None:
        run_id = _run_signature(data_key if data_key is not None else fingerprint(u), k, seed, cfg)
        release(u)  # a fingerprint read every row: 1 GB resident at 1M x 512 fp16 otherwise
    start = 0
    if checkpoint is not None and resume and Path(checkpoint).exists():
        ck = load_checkpoint(Path(checkpoint), run_id, "stage-1 checkpoint", "data, K, seed or settings")
        heads.load_state_dict(ck["heads"])
        opt.load_state_dict(ck["opt"])
        g.set_state(ck["rng"])
        centers = None if ck["centers"] is None else ck["centers"].to(device)
        center_tau = ck["center_tau"]
        if state is not None:
            state.shares = ck["shares"].to(device)
        history, start = ck["history"], ck["epoch"] + 1
        log.info("stage 1 resumes after epoch %d from %s", ck["epoch"], checkpoint)
    if cfg.center_target:
        if centers is None:
            centers = losses.initial_centers(v, k, seed, chunk_size=chunks.assign).to(device)
        # the target's temperature from the initial centres (computed once; a resumed run
        # reads it back, so it trains exactly as before)
        if center_tau is None:
            center_tau = losses.center_temperature(v, centers, cfg.center_tau)
        release(v)
    size = min(cfg.batch_size, n)
    # as many batches as `_batches` makes: a lone last row joins the previous batch
    steps_per_epoch = -(-n // size) - (1 if n > size and n % size == 1 else 0)
    epochs = stage1_epochs(cfg, n, k)
    if epochs != cfg.epochs:
        log.info("stage 1: %d epochs at K = %d over %d rows (stage1.cluster_visits = %d; 0 trains stage1.epochs = %d)",
                 epochs, k, n, cfg.cluster_visits, cfg.epochs)
    bar = tqdm(total=epochs * steps_per_epoch, initial=start * steps_per_epoch, desc="stage 1", unit="step",
               disable=not progress, leave=False)
    for epoch in range(start, epochs):
        heads.train()
        t0, sums, steps = time.perf_counter(), {}, 0
        plan = _epoch_plan(ni, nt, n, cfg.batch_size, g)
        release(ni, nt)
        sizes = [[hi - lo for lo, hi in (dist.shard_range(p[0].numel(), r, world) for r in range(world))] for p in plan]
        if world > 1:
            plan = [tuple(t[slice(*dist.shard_range(p[0].numel(), rank, world))] for t in p) for p in plan]
        for step, (idx, x_i, x_t) in enumerate(prefetch(_gather(u, v, plan, device))):
            b = idx.numel()
            ub, vb = x_i[:b], x_t[:b]  # the batch's own rows (then their neighbours')
            logits_i, logits_t = model(x_i, x_t)
            prior = state.prior() if state is not None else None
            terms = dict(cluster_tau=cfg.cluster_tau, center_tau=center_tau or cfg.center_tau, w_instance=cfg.w_instance,
                         w_assignment=cfg.w_assignment, w_center=cfg.w_center, w_balance=cfg.w_balance)
            target = centers if cfg.center_target else None
            # drawn from the batches' generator: the same on every rank, checkpointed with it
            columns = torch.randperm(k, generator=g)[: cfg.cluster_columns].to(device) if subset else None
            if use_fused:
                res = fused_step(logits_i, logits_t, ub, vb, target, prior, **terms)
                p, q = res.probs_i[:b], res.probs_t[:b]
                parts, loss, marginal = {name: getattr(res, name) for name in PARTS}, res.loss, res.marginal
            else:
                p, p_n, q, q_n, ub, vb = (dist.gather_batch(t, sizes[step]) for t in (
                    *torch.softmax(logits_i, 1).split(b), *torch.softmax(logits_t, 1).split(b), ub, vb))
                loss, parts, marginal = stage1_loss(p, q, p_n, q_n, ub, vb, target, prior, columns=columns, **terms)
            if state is not None:
                state.update(marginal)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"stage 1 loss became {float(loss)} at epoch {epoch}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if centers is not None:
                centers = losses.update_centers(centers, p.detach(), q.detach(), vb, cfg.center_momentum)
            for name, val in {**parts, "total": loss}.items():
                sums[name] = sums.get(name, 0.0) + float(val.detach())
            steps += 1
            bar.update(1)
            if steps % 8 == 0:
                # random rows of memory-mapped arrays: 8 steps touch ~16k rows' pages of
                # each; dropping them keeps the resident set at that, not at N x D
                release(u, v)
        row = {"epoch": epoch, **{k_: s / steps for k_, s in sums.items()}, "seconds": time.perf_counter() - t0}
        history.append(row)
        bar.set_postfix(epoch=epoch, loss=f"{row['total']:.3f}")
        if checkpoint is not None and rank == 0:
            payload = {"run": run_id, "epoch": epoch, "heads": heads.state_dict(), "opt": opt.state_dict(),
                       "rng": g.get_state(), "centers": centers, "center_tau": center_tau, "history": history,
                       "shares": state.shares if state is not None else None}
            atomic_write(Path(checkpoint), lambda f: torch.save(payload, f))
        dist.barrier()  # every rank sees the checkpoint of this epoch before going on
    bar.close()
    heads.eval()
    lo, hi = dist.shard_range(n, rank, world)
    labels, conf = heads.predict(u[lo:hi], v[lo:hi] if cfg.predict_with == "both" else None, chunk_size=chunks.assign)
    release(u, v)  # the prediction read every row of both
    labels, conf = dist.all_gather_rows(labels), dist.all_gather_rows(conf)
    return Stage1Result(heads, labels, conf, history)
