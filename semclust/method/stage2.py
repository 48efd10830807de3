"""Stage 2: self-enhancement with the stage-1 model's confident pseudo-labels.

Each epoch: (1) predict every sample on its plain view with the current encoder + image
head, mixed half-and-half with the stage-1 prediction (which anchors the labels against
drift); (2) keep the most confident `confident_fraction` of every cluster (class-balanced,
so no cluster is starved, at least `min_per_cluster`); (3) train the encoder's tail and
the image head with a confidence-weighted, class-balanced cross-entropy on a strong view
(weight 1 at or above the mean confidence of the kept samples, Gaussian fall-off below).

What is fine-tuned depends on the input:

* images + a CLIP encoder: the last `finetune_blocks` blocks of the vision tower;
* embeddings only: a `ResidualAdapter` on the frozen features (said so in the result's
  `mode`), since there is no encoder to tune.

Any object with `image_features(batch) -> [B, D]` (L2-normalised, differentiable),
`tail_parameters(n) -> list[Parameter]` and `view_transform(kind) -> callable` for
kind in {"eval", "weak", "strong"} can be tuned: `ClipEncoder`, `SyntheticEncoder`,
`FeatureAdapter`.

With a `checkpoint` path the training state is written there atomically after every
epoch; `resume` continues a checkpoint of the same run and ends bit-identical to an
uninterrupted run (see `train_stage2`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import Stage2Config
from ..inputs.sources import Source, collate_skip, iter_batches
from ..runtime import distributed as dist
from ..runtime.files import atomic_write, load_checkpoint
from .heads import ClusterHead, ResidualAdapter

log = logging.getLogger(__name__)


class Tunable(Protocol):
    def image_features(self, batch: Tensor) -> Tensor: ...
    def tail_parameters(self, n_blocks: int) -> list[nn.Parameter]: ...
    def view_transform(self, kind: str) -> Callable[[Any], Tensor]: ...


class FeatureAdapter(nn.Module):
    """The tunable 'encoder' for embeddings-only input: a residual adapter on frozen
    features, with feature-space views (Gaussian noise; dropout for the strong view)."""

    def __init__(self, dim: int, cfg: Stage2Config) -> None:
        super().__init__()
        self.adapter = ResidualAdapter(dim, cfg.adapter_hidden)
        self.noise = {"eval": 0.0, "weak": cfg.weak_noise, "strong": cfg.strong_noise}
        self.dropout = {"eval": 0.0, "weak": 0.0, "strong": cfg.strong_dropout}

    def image_features(self, u: Tensor) -> Tensor:
        # stores hold fp16 rows; the adapter computes in its own (float32) dtype
        return self.adapter(u.to(self.adapter.down.weight.dtype))

    def tail_parameters(self, n_blocks: int = 1) -> list[nn.Parameter]:
        return list(self.adapter.parameters())

    def view_transform(self, kind: str) -> Callable[[Tensor], Tensor]:
        return _FeatureView(self.noise[kind], self.dropout[kind])


class _FeatureView:
    def __init__(self, noise: float, dropout: float) -> None:
        self.noise, self.dropout = noise, dropout

    def __call__(self, u: Tensor) -> Tensor:
        out = u + self.noise * torch.randn_like(u) if self.noise else u
        if self.dropout:
            out = out * (torch.rand_like(u) >= self.dropout) / (1 - self.dropout)
        return F.normalize(out, dim=-1)


class _TwoViews:
    def __init__(self, weak: Callable, strong: Callable) -> None:
        self.weak, self.strong = weak, strong

    def __call__(self, item: Any) -> Tensor:
        return torch.stack([self.weak(item), self.strong(item)])


@dataclass
class Stage2Result:
    head: ClusterHead
    encoder: Any  # the tuned encoder (ClipEncoder, SyntheticEncoder or FeatureAdapter)
    mode: str  # "encoder" or "adapter"
    labels: Tensor  # [N]
    conf: Tensor  # [N]
    # [K, D] float32 on the CPU: L2-normalised sum (= normalised mean) of the tuned
    # encoder's plain-view features of each cluster under the final `labels`; a cluster
    # with no member keeps a zero row. Accumulated batch by batch, so memory is O(K D)
    # rather than O(N D); equals `ops.center_update(features, K, labels=labels)[0]`.
    centers: Tensor
    history: list[dict] = field(default_factory=list)


def select_confident(labels: Tensor, conf: Tensor, k: int, cfg: Stage2Config) -> tuple[Tensor, Tensor]:
    """Class-balanced confident subset: (indices [S], weights [S]).

    Per cluster the top `confident_fraction` by confidence (at least `min_per_cluster`
    where the cluster has them). Weight = 1 at or above the mean kept confidence,
    exp(-(c - mean)^2 / 2 sigma^2) below, then rescaled so each cluster's weights sum
    to the same total (a small cluster counts as much as a large one).
    """
    idx = []
    for c in range(k):
        members = torch.nonzero(labels == c).flatten()
        if members.numel() == 0:
            continue
        take = max(int(round(cfg.confident_fraction * members.numel())), min(cfg.min_per_cluster, members.numel()))
        top = members[torch.topk(conf[members], take).indices]
        idx.append(top)
    sel = torch.cat(idx)
    c_sel = conf[sel]
    mean = c_sel.mean()
    w = torch.where(c_sel >= mean, torch.ones_like(c_sel), torch.exp(-((c_sel - mean) ** 2) / (2 * cfg.confidence_sigma**2)))
    lab = labels[sel]
    per_cluster = torch.zeros(k, dtype=w.dtype).index_add(0, lab, w)
    present = (per_cluster > 0).sum()
    w = w * (w.sum() / present) / per_cluster[lab]
    return sel, w


@torch.no_grad()
def _predict(
    encoder: Tunable, head: ClusterHead, source: Source, cfg: Stage2Config, progress: bool, desc: str,
    centers_k: Optional[int] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Labels and confidences [N] of the current encoder + head on the plain view
    (probabilities exist one batch at a time), and with `centers_k` = K the cluster
    centres [K, D] float32 (CPU): per predicted label the sum of the features, summed
    batch by batch in source order (float32, on the features' device), L2-normalised; a
    cluster nothing was predicted for keeps a zero row. Skipped items (label 0, conf 0)
    add nothing. Only [batch, D] features and [K, D] sums exist at a time."""
    head.eval()
    labels = torch.zeros(len(source), dtype=torch.long)
    conf = torch.zeros(len(source))
    # under torch.distributed each rank predicts its share of the rows; the sums below
    # (other ranks' rows are zero here) make every rank's arrays whole
    rank, world = dist.rank_world()
    mine = range(*dist.shard_range(len(source), rank, world)) if world > 1 else None
    sums: Optional[Tensor] = None
    for batch, kept, _skipped in iter_batches(source, encoder.view_transform("eval"), cfg.batch_size * 4,
                                              workers=cfg.num_workers, indices=mine, progress=progress, desc=desc):
        if batch is None:
            continue
        z = encoder.image_features(batch)
        c, l = torch.softmax(head(z), dim=1).max(1)
        labels[kept], conf[kept] = l.cpu(), c.cpu()
        if centers_k is not None:
            if sums is None:
                sums = torch.zeros(centers_k, z.shape[1], dtype=torch.float32, device=z.device)
            sums.index_add_(0, l.to(z.device), z.float())
    if world > 1:
        labels, conf = dist.all_reduce_sum(labels), dist.all_reduce_sum(conf)
    if centers_k is None:
        return labels, conf, None
    if sums is None:  # every item was skipped: no feature, no centre
        sums = torch.zeros(centers_k, head.dim, dtype=torch.float32)
    return labels, conf, F.normalize(dist.all_reduce_sum(sums), dim=1).cpu()


def _run_signature(stage1_labels: Tensor, stage1_conf: Tensor, k: int, seed: int, mode: str, cfg: Stage2Config,
                   tuned: list[Tensor]) -> str:
    """What a checkpoint must match to be resumed: the stage-1 labels and confidences (all
    their bytes), K, the seed, the mode, every setting but the number of epochs (training
    may be extended) and the shapes of the tuned parameters."""
    settings = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "epochs"}
    head = json.dumps({"n": int(stage1_labels.numel()), "k": k, "seed": seed, "mode": mode, "cfg": settings,
                       "tuned": [list(p.shape) for p in tuned]}, sort_keys=True)
    h = hashlib.sha256(head.encode())
    h.update(stage1_labels.detach().cpu().to(torch.int64).contiguous().numpy().data)
    h.update(stage1_conf.detach().cpu().to(torch.float32).contiguous().numpy().data)
    return h.hexdigest()


class _Tuned(nn.Module):
    """encoder features -> head logits as one module, so DDP sees one forward per step."""

    def __init__(self, encoder: nn.Module, head: ClusterHead) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder.image_features(x))


def _rank_batches(order: Tensor, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This rank's slice of each global batch of `order`. With several ranks a last batch
    that would leave a rank fewer than 2 rows (BatchNorm) is dropped on every rank alike,
    so all ranks take the same number of steps (DDP's collectives pair them up)."""
    out = []
    for b in order.split(batch_size):
        if world > 1 and b.numel() < 2 * world:
            continue
        out.append(b[slice(*dist.shard_range(b.numel(), rank, world))].tolist())
    return out


def train_stage2(
    encoder: Tunable,
    source: Source,
    head: ClusterHead,
    stage1_labels: Tensor,
    stage1_conf: Tensor,
    k: int,
    cfg: Optional[Stage2Config] = None,
    mode: str = "encoder",
    seed: int = 0,
    progress: bool = True,
    checkpoint: Optional[Union[str, Path]] = None,
    resume: bool = False,
) -> Stage2Result:
    """Fine-tune `encoder`'s tail + `head` on `source` (a data set of raw items whose
    `transform` this function sets) from the stage-1 labels/confidences [N].

    With `checkpoint`, the training state is written there atomically after every epoch:
    the run signature, the epoch, the tuned parameters (`encoder.tail_parameters`, by
    position; not the whole encoder), the head's and the optimiser's state, the sampling
    generator and the global torch RNG (augmentations and DataLoader worker seeds draw
    from it), the current labels/confidences and the history. With `resume` too, an
    existing checkpoint of the same run (same stage-1 labels and confidences, K, seed,
    mode and settings but the epoch count) is continued after its epoch, ending
    bit-identical to an uninterrupted run (for deterministic kernels, e.g. on the CPU); a
    checkpoint of another run or an unreadable file raises ValueError.

    Returns the head, the tuned encoder, the final labels/confidences [N], the cluster
    centres [K, D] of the tuned features (see `Stage2Result.centers`) and the history.
    """
    cfg = cfg or Stage2Config()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    rank, world = dist.rank_world()
    model: Optional[nn.Module] = None
    if world > 1:
        # data-parallel: each rank takes its slice of every global batch (the weighted
        # loss is normalised by the global weight sum, BatchNorm uses global statistics);
        # the augmentation noise is drawn per rank, so P ranks equal one process in law,
        # not bit for bit
        if mode != "adapter" or not isinstance(encoder, nn.Module):
            raise ValueError("stage 2 runs data-parallel in adapter mode (embeddings) only")
        dist.use_global_batchnorm(head)
        model = torch.nn.parallel.DistributedDataParallel(_Tuned(encoder, head), broadcast_buffers=False)
    tuned = encoder.tail_parameters(cfg.finetune_blocks)
    params = [
        {"params": tuned, "lr": cfg.lr if mode == "encoder" else cfg.adapter_lr},
        {"params": list(head.parameters()), "lr": cfg.head_lr},
    ]
    opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
    s1_labels, s1_conf = stage1_labels.cpu(), stage1_conf.cpu().float()
    labels, conf = s1_labels, s1_conf
    history = []
    run_id = _run_signature(s1_labels, s1_conf, k, seed, mode, cfg, tuned) if checkpoint is not None else ""
    start = 0
    if checkpoint is not None and resume and Path(checkpoint).exists():
        ck = load_checkpoint(Path(checkpoint), run_id, "stage-2 checkpoint", "stage-1 labels, K, seed, mode or settings")
        saved = ck["tuned"]
        if len(saved) != len(tuned) or any(s.shape != p.shape for s, p in zip(saved, tuned)):
            raise ValueError(f"cannot resume: {checkpoint} holds other tuned parameters than this encoder's")
        with torch.no_grad():
            for p, s in zip(tuned, saved):
                p.copy_(s)
        head.load_state_dict(ck["head"])
        opt.load_state_dict(ck["opt"])
        g.set_state(ck["rng"])
        torch.set_rng_state(ck["torch_rng"])
        labels, conf = ck["labels"], ck["conf"]
        history, start = ck["history"], ck["epoch"] + 1
        log.info("stage 2 resumes after epoch %d from %s", ck["epoch"], checkpoint)
    bar = tqdm(range(start, cfg.epochs), desc=f"stage 2 ({mode})", unit="epoch", disable=not progress, leave=False,
               initial=start, total=cfg.epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        sel, w = select_confident(labels, conf, k, cfg)
        source.transform = _TwoViews(encoder.view_transform("weak"), encoder.view_transform("strong"))
        order = sel[torch.randperm(sel.numel(), generator=g)]
        weight_of = torch.zeros(len(source))
        weight_of[sel] = w
        loader = DataLoader(source, batch_sampler=_rank_batches(order, cfg.batch_size, rank, world),
                            num_workers=cfg.num_workers, collate_fn=collate_skip)
        head.train()
        total, steps = 0.0, 0
        for batch, kept, _skipped in loader:
            if world == 1 and (batch is None or batch.shape[0] < 2):
                continue
            ids = kept  # items carry their source index
            strong = batch[:, 1]
            logits = model(strong) if model is not None else head(encoder.image_features(strong))
            ce = F.cross_entropy(logits, labels[ids].to(logits.device), reduction="none")
            wb = weight_of[ids].to(logits.device)
            # each rank's share of the batch loss; DDP averages, hence the factor world
            loss = (wb * ce).sum() / dist.all_reduce_sum(wb.sum().detach()).clamp_min(1e-12) * world
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(dist.all_reduce_sum(loss.detach().clone())) / world
            steps += 1
        cur_labels, cur_conf, _ = _predict(encoder, head, source, cfg, False, "refresh")
        # anchor on stage 1: agreeing samples keep the mean confidence, disagreeing ones
        # are halved, which is the argmax/max of 0.5 * (p_now + onehot(stage 1) * conf_1)
        agree = cur_labels == s1_labels
        conf = torch.where(agree, 0.5 * (cur_conf + s1_conf), 0.5 * torch.maximum(cur_conf, s1_conf))
        labels = torch.where(agree | (cur_conf >= s1_conf), cur_labels, s1_labels)
        history.append({"epoch": epoch, "loss": total / max(steps, 1), "selected": int(sel.numel()),
                        "changed": int((labels != s1_labels).sum()), "seconds": time.perf_counter() - t0})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
        if checkpoint is not None and rank == 0:
            payload = {"run": run_id, "epoch": epoch, "tuned": [p.detach() for p in tuned],
                       "head": head.state_dict(), "opt": opt.state_dict(), "rng": g.get_state(),
                       "torch_rng": torch.get_rng_state(), "labels": labels, "conf": conf, "history": history}
            atomic_write(Path(checkpoint), lambda f: torch.save(payload, f))
        dist.barrier()
    final_labels, final_conf, centers = _predict(encoder, head, source, cfg, progress, "stage 2 predict", centers_k=k)
    return Stage2Result(head, encoder, mode, final_labels, final_conf, centers, history)
