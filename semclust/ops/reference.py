"""The ops in plain PyTorch: the definition every kernel is tested against.

Every function here works on any device and dtype (it computes in float32 or better and
returns the input dtype where a feature vector is returned), is differentiable where its
public op is, and works in row chunks so its memory is bounded by the chunk: an op never
forms the N x K, N x W or N x N matrix unless the caller asks for it (`return_probs`).
Inputs are assumed validated (see `semclust.ops.validate`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.nn import functional as F


class AssignResult(NamedTuple):
    labels: Tensor  # [N] int64, argmax_k P_ik
    conf: Tensor  # [N] float, max_k P_ik
    colsum: Tensor  # [K] float, sum_i P_ik
    probs: Optional[Tensor]  # [N, K] float, only when asked for


class BalanceResult(NamedTuple):
    marginal: Tensor  # [K], p_bar
    entropy: Tensor  # [], -sum_k w_k p_bar_k log p_bar_k
    kl: Tensor  # [], KL(p_bar || uniform) = log K - H(p_bar)


class KMeansResult(NamedTuple):
    centers: Tensor  # [K, D], L2-normalised
    labels: Tensor  # [N] int64
    objective: Tensor  # [], mean_i (1 - cos(x_i, c_{label_i})); lower is better


PARTS = ("instance", "assignment", "center", "balance")


class StepResult(NamedTuple):
    loss: Tensor  # [] total, differentiable w.r.t. logits_i and logits_t
    instance: Tensor  # [] the unweighted parts (detached)
    assignment: Tensor
    center: Tensor
    balance: Tensor
    marginal: Tensor  # [K] (mean p + mean q) / 2, for the balance-weight EMA
    probs_i: Tensor  # [2B, K] softmax(logits_i) (detached)
    probs_t: Tensor  # [2B, K] softmax(logits_t) (detached)


_CENTER_CHUNK = 65536
# elements of one knn score tile [query rows, database rows]: the merge below holds ~7x
# its float32 size (scores, candidates, their int64 ids, the sort's values and indices),
# so 2^23 keeps a tile near 200 MB; the default 4096 x 65536 chunks alone were ~7 GB
_KNN_TILE = 1 << 23
_EPS = 1e-8


def _compute_dtype(*ts: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _scores(a: Tensor, b: Tensor) -> Tensor:
    """a @ b.T, [m, n]. On CPU b gets zero rows up to a multiple of 8 and the product's
    padding columns are dropped (a view): MKL runs a product whose width is not a multiple
    of 8 on a slow path (on an AMD EPYC 1.5x slower at 333 columns; `retrieve` 1.15-1.3x
    slower at a 1003-noun bank; the ext pads its tiles the same way, see csrc/cpu_common.h)."""
    n = b.shape[0]
    if a.device.type != "cpu" or n % 8 == 0:
        return a @ b.T
    return (a @ F.pad(b, (0, 0, 0, -n % 8)).T)[:, :n]


def assign(x: Tensor, c: Tensor, tau: float, return_probs: bool = False, chunk_size: int = 65536) -> AssignResult:
    dt = _compute_dtype(x, c)
    cc = c.to(dt)
    labels, conf, probs = [], [], []
    colsum = torch.zeros(c.shape[0], dtype=dt, device=x.device)
    for s in range(0, x.shape[0], chunk_size):
        logits = _scores(x[s : s + chunk_size].to(dt), cc) / tau
        # softmax subtracts the row max, so tau = 0.005 (logits ~ 200) cannot overflow
        p = torch.softmax(logits, dim=1)
        m, idx = p.max(dim=1)
        labels.append(idx)
        conf.append(m)
        colsum = colsum + p.sum(0)
        if return_probs:
            probs.append(p)
    return AssignResult(
        torch.cat(labels),
        torch.cat(conf),
        colsum,
        torch.cat(probs) if return_probs else None,
    )


def retrieve(x: Tensor, bank: Tensor, tau: float, normalize: bool = True, chunk_size: int = 4096) -> Tensor:
    dt = _compute_dtype(x, bank)
    b = bank.to(dt)
    out = []
    for s in range(0, x.shape[0], chunk_size):
        w = torch.softmax(_scores(x[s : s + chunk_size].to(dt), b) / tau, dim=1)
        v = w @ b
        if normalize:
            v = torch.nn.functional.normalize(v, dim=1)
        out.append(v)
    return torch.cat(out).to(x.dtype)


def _top_columns(s: Tensor, k: int) -> Tensor:
    """[m, k] columns of the k largest entries of each row of s [m, n], best first, an
    earlier column first among equal scores: the first k of a stable descending sort,
    without sorting all n (topk finds the k-th score t; every entry above t is in, and the
    earliest entries equal to t fill the rest; one stable sort of the k chosen orders them)."""
    t = s.topk(k, dim=1, sorted=False).values.min(1, keepdim=True).values
    above, tied = s > t, s == t
    room = k - above.sum(1, keepdim=True)
    chosen = above | tied
    crowded = (tied.sum(1, keepdim=True) > room).squeeze(1)  # more entries equal t than places
    if bool(crowded.any()):
        r = crowded.nonzero().squeeze(1)
        chosen[r] = above[r] | (tied[r] & (tied[r].cumsum(1) <= room[r]))
    cols = chosen.nonzero()[:, 1].view(s.shape[0], k)  # increasing column order per row
    return cols.gather(1, torch.sort(s.gather(1, cols), dim=1, descending=True, stable=True).indices)


def knn(
    x: Tensor,
    k: int,
    queries: Optional[Tensor] = None,
    exclude_self: bool = True,
    query_chunk: int = 4096,
    database_chunk: int = 65536,
) -> tuple[Tensor, Tensor]:
    """Exact top-k inner-product search; a running top-k merges database chunks of at
    most `database_chunk` rows and at most _KNN_TILE scores per tile."""
    dt = _compute_dtype(x) if queries is None else _compute_dtype(x, queries)
    q_all = x if queries is None else queries
    drop_self = queries is None and exclude_self
    scores_out, idx_out = [], []
    for qs in range(0, q_all.shape[0], query_chunk):
        q = q_all[qs : qs + query_chunk].to(dt)
        # the lists do not depend on the database step (the merge is exact, ties included)
        step = min(database_chunk, max(k, _KNN_TILE // q.shape[0]))
        best_s = torch.full((q.shape[0], 0), -math.inf, dtype=dt, device=x.device)
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.int64, device=x.device)
        for ds in range(0, x.shape[0], step):
            sim = _scores(q, x[ds : ds + step].to(dt))
            if drop_self:
                rows = torch.arange(q.shape[0], device=x.device)
                cols = rows + qs - ds
                ok = (cols >= 0) & (cols < sim.shape[1])
                sim[rows[ok], cols[ok]] = -math.inf
            if k == 1:
                # top-1 (k-means' nearest centre): argmax returns the first maximum, the
                # stable sort's tie rule, and an earlier chunk keeps its tie; no sort
                i = sim.argmax(1, keepdim=True)
                s = sim.gather(1, i)
                if best_s.shape[1] == 0:
                    best_s, best_i = s, i + ds
                else:
                    better = s > best_s
                    best_s, best_i = torch.where(better, s, best_s), torch.where(better, i + ds, best_i)
                continue
            cand_s = torch.cat([best_s, sim], dim=1)
            kk = min(k, cand_s.shape[1])
            order = _top_columns(cand_s, kk)
            # a column below the kept list's width is a kept neighbour, the rest database rows
            nb = best_i.shape[1]
            kept = best_i.gather(1, order.clamp_max(max(nb - 1, 0))) if nb else order
            best_s, best_i = cand_s.gather(1, order), torch.where(order < nb, kept, order - nb + ds)
        scores_out.append(best_s)
        idx_out.append(best_i)
    return torch.cat(scores_out).to(q_all.dtype), torch.cat(idx_out)


def center_update(
    x: Tensor,
    k: int,
    labels: Optional[Tensor] = None,
    probs: Optional[Tensor] = None,
    normalize: bool = True,
    previous: Optional[Tensor] = None,
    momentum: float = 0.0,
) -> tuple[Tensor, Tensor]:
    dt = _compute_dtype(x)
    sums = torch.zeros(k, x.shape[1], dtype=dt, device=x.device)
    # row chunks: a memory-mapped fp16 x is never copied whole into float32
    for s in range(0, x.shape[0], _CENTER_CHUNK):
        xx = x[s : s + _CENTER_CHUNK].to(dt)
        if labels is not None:
            sums = sums.index_add(0, labels[s : s + _CENTER_CHUNK], xx)
        else:
            sums = sums + probs[s : s + _CENTER_CHUNK].to(dt).T @ xx
    counts = torch.bincount(labels, minlength=k).to(dt) if labels is not None else probs.to(dt).sum(0)
    centers = torch.nn.functional.normalize(sums, dim=1) if normalize else sums / counts.clamp_min(1e-12)[:, None]
    if previous is not None:
        prev = previous.to(dt)
        empty = counts <= 0
        # an empty cluster keeps its previous centre instead of collapsing to zero
        centers = torch.where(empty[:, None], prev, momentum * prev + (1.0 - momentum) * centers)
        if normalize:
            centers = torch.nn.functional.normalize(centers, dim=1)
    return centers.to(x.dtype), counts


def balance(probs_or_colsum: Tensor, n: Optional[int] = None, weights: Optional[Tensor] = None) -> BalanceResult:
    t = probs_or_colsum.to(_compute_dtype(probs_or_colsum))
    marginal = t.mean(0) if t.dim() == 2 else t / n
    k = marginal.shape[0]
    # x log x -> 0 at x = 0; the clamp keeps the gradient finite for empty clusters
    plogp = marginal * torch.log(marginal.clamp_min(torch.finfo(marginal.dtype).tiny))
    w = torch.ones_like(marginal) if weights is None else weights.to(marginal.dtype)
    entropy = -(w * plogp).sum()
    kl = math.log(k) + plogp.sum()
    return BalanceResult(marginal, entropy, kl)


def bn_momentum(momentum: Optional[float], num_batches_tracked: Optional[Tensor]) -> float:
    """A training step's factor for the running statistics, nn.BatchNorm1d's rule: counts
    the batch in `num_batches_tracked` (if given), then `momentum`, or when it is None a
    cumulative average, 1 / batches seen."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return 1.0 / float(num_batches_tracked) if momentum is None else float(momentum)


def batchnorm_relu(h: Tensor, weight: Tensor, bias: Tensor, running_mean: Optional[Tensor] = None,
                   running_var: Optional[Tensor] = None, training: bool = True, momentum: Optional[float] = 0.1,
                   eps: float = 1e-5, num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """relu(batch_norm(h)), torch's own ops (`semclust.ops.batchnorm_relu` has the math)."""
    m = bn_momentum(momentum, num_batches_tracked) if training else 0.0
    return torch.relu(torch.nn.functional.batch_norm(h, running_mean, running_var, weight, bias, training, m, eps))


def _sq_dist_to_nearest(x: Tensor, centers: Tensor, chunk_size: int) -> Tensor:
    out = []
    for s in range(0, x.shape[0], chunk_size):
        out.append(1.0 - (x[s : s + chunk_size].float() @ centers.T).max(dim=1).values)
    return torch.cat(out).clamp_min(0)


def kmeans_pp_init(x: Tensor, k: int, generator: torch.Generator, chunk_size: int) -> Tensor:
    """Greedy k-means++ seeding with the spherical distance 1 - cos.

    Each new seed is the best of 2 + ln(k) candidates drawn with probability ~ distance to
    the nearest seed so far: the one that lowers the total distance most (Arthur &
    Vassilvitskii 2007, sec. 6; scikit-learn's default). Plain k-means++ (one candidate)
    often seeds one blob twice and another not at all, a local minimum Lloyd cannot
    leave: on 4 of 10 sets of normalised blobs (2000 x 32, K = 10) its best of 3 restarts
    ended 5-18% above scikit-learn's objective; greedy seeding matched it on all 10
    (tests/ops/test_kmeans.py::test_as_good_as_sklearn).
    """
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = torch.randint(n, (1,), generator=generator, device=x.device)
    chosen = [first]
    d = _sq_dist_to_nearest(x, x[first].float(), chunk_size)
    for _ in range(1, k):
        total = d.sum()
        if total <= 0:  # every row is already a seed (duplicates): any row will do
            chosen.append(torch.randint(n, (1,), generator=generator, device=x.device))
            continue
        cand = torch.multinomial(d / total, trials, replacement=True, generator=generator)
        # [N, trials] distances to each candidate, chunked like every other pass over x
        dc = torch.cat([1.0 - x[s : s + chunk_size].float() @ x[cand].float().T for s in range(0, n, chunk_size)])
        dc = torch.minimum(d[:, None], dc.clamp_min(0))
        best = int(dc.sum(0).argmin())
        chosen.append(cand[best : best + 1])
        d = dc[:, best]
    return x[torch.cat(chosen)].float()


# ---- the stage-1 loss (the definition `fused_step` computes in one call) ------------------
#
# Notation: P = softmax(f_I(u)) and Q = softmax(f_T(v)) are [B, K] assignments of a
# batch's images and text counterparts; P_n / Q_n are those of a random cross-modal
# neighbour (an image neighbour for the text side and vice versa, as in TAC's neighbour
# distillation).


def instance_loss(p: Tensor, q: Tensor, p_n: Tensor, q_n: Tensor) -> Tensor:
    """-log <p_i, q_i> (a sample agrees with its own counterpart; TAC's BCE(<p,q>, 1))
    plus the same for its cross-modal neighbours (-log <p_i, q_n_i>, -log <q_i, p_n_i>)."""
    own = -torch.log((p * q).sum(1).clamp_min(_EPS)).mean()
    nbr = -0.5 * (torch.log((p * q_n).sum(1).clamp_min(_EPS)).mean() + torch.log((q * p_n).sum(1).clamp_min(_EPS)).mean())
    return own + nbr


def cluster_infonce(a: Tensor, b: Tensor, tau: float) -> Tensor:
    """Symmetric InfoNCE over the 2K cluster vectors of a and b ([B, K] each): column k of
    `a` is pulled to column k of `b` and pushed from every other column of both (TAC,
    temperature 0.5). Works for any [n, K] pair, e.g. [K, D] centres transposed."""
    k = a.shape[1]
    z = F.normalize(torch.cat([a.T, b.T], dim=0), dim=1)
    sim = z @ z.T / tau
    sim = sim.masked_fill(torch.eye(2 * k, dtype=torch.bool, device=a.device), float("-inf"))
    target = torch.cat([torch.arange(k, 2 * k), torch.arange(0, k)]).to(a.device)
    return F.cross_entropy(sim, target)


def assignment_loss(p: Tensor, q: Tensor, p_n: Tensor, q_n: Tensor, cluster_tau: float,
                    columns: Optional[Tensor] = None) -> Tensor:
    """Cluster-level consistency of the assignment columns across modalities and
    neighbours: InfoNCE(P, Q_n) + InfoNCE(Q, P_n), halved.

    `columns` [m] (distinct cluster ids, optional): the InfoNCE over those clusters only,
    each one's positive its own column and its negatives the other 2m - 2. Its cost is
    (2m)^2 B instead of (2K)^2 B, which at K = 1000 and B = 512 is 70% of a step."""
    if columns is not None:
        p, q, p_n, q_n = (t[:, columns] for t in (p, q, p_n, q_n))
    return 0.5 * (cluster_infonce(p, q_n, cluster_tau) + cluster_infonce(q, p_n, cluster_tau))


def soft_centers(p: Tensor, z: Tensor) -> Tensor:
    """c_k = normalise(sum_i p_ik z_i): [K, D] confidence-weighted centres."""
    return F.normalize(p.T @ z, dim=1)


def center_loss(
    p: Tensor, q: Tensor, u: Tensor, v: Tensor, centers: Optional[Tensor], cluster_tau: float, center_tau: float,
    columns: Optional[Tensor] = None,
) -> Tensor:
    """Centre-level consistency.

    (1) image centres sum_i p_ik u_i and text centres sum_i q_ik v_i are aligned
        by InfoNCE over the K centre pairs (temperature `cluster_tau`), or over the
        clusters in `columns` [m] only (as in `assignment_loss`);
    (2) "better centre generation": `centers` [K, D] live in the text-counterpart space,
        where CLIP's nuisance factors (style, background) that dominate image features
        are weakest; they start from k-means on the counterparts and follow an EMA of
        confident members (`method.losses.update_centers`). Both heads are pulled towards
        the assignment those centres give, softmax(v c^T / center_tau): a prototype target
        that is steadier than any batch and carries the semantic clusters' own sizes.
    """
    pc, qc = (p, q) if columns is None else (p[:, columns], q[:, columns])
    ci, ct = soft_centers(pc, u), soft_centers(qc, v)
    logits = ci @ ct.T / cluster_tau
    tgt = torch.arange(ci.shape[0], device=p.device)
    loss = 0.5 * (F.cross_entropy(logits, tgt) + F.cross_entropy(logits.T, tgt))
    if centers is not None:
        target = assign(v.detach(), centers, center_tau, return_probs=True).probs
        loss = loss - 0.5 * (target * (torch.log(p.clamp_min(_EPS)) + torch.log(q.clamp_min(_EPS)))).sum(1).mean()
    return loss


def balance_loss(p: Tensor, q: Tensor, prior: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(KL(p_bar || prior) + KL(q_bar || prior), the marginal (p_bar + q_bar) / 2 detached),
    p_bar = mean_i p_i the batch's cluster marginal.

    `prior` [K] (positive, summing to 1) is the cluster prior the marginals are pulled
    to: the dynamic balancing regularizer's estimate (`method.losses.BalancePrior`);
    None gives the uniform prior, where KL(p_bar || U) = log K - H(p_bar) is TAC's
    entropy term up to a constant."""
    dt = _compute_dtype(p)
    k = p.shape[1]
    log_prior = torch.full((k,), -math.log(k), dtype=dt, device=p.device) if prior is None else torch.log(prior.to(dt))
    bp, bq = balance(p), balance(q)
    # KL(m || pi) = sum_k m_k log m_k - sum_k m_k log pi_k = -H(m) - <m, log pi>
    kl = -(bp.entropy + bq.entropy) - ((bp.marginal + bq.marginal) * log_prior).sum()
    marginal = (0.5 * (bp.marginal + bq.marginal)).detach()
    return kl, marginal


def stage1_loss(
    p: Tensor, q: Tensor, p_n: Tensor, q_n: Tensor, u: Tensor, v: Tensor,
    centers: Optional[Tensor], prior: Optional[Tensor], *,
    cluster_tau: float, center_tau: float, w_instance: float, w_assignment: float, w_center: float, w_balance: float,
    columns: Optional[Tensor] = None,
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """The stage-1 loss on probabilities, free of side effects: (loss [], parts
    {instance, assignment, center, balance} [] each, marginal [K] detached).

    loss = w_instance instance + w_assignment assignment + w_center center + w_balance balance;
    see each term's function. p, q [B, K] of the batch, p_n, q_n [B, K] of its sampled
    neighbours, u, v [B, D] its features, centers [K, D] or None, prior [K] or None;
    `columns` [m] or None: the clusters the two cluster-level InfoNCE terms compare (all
    K when None; the other terms always see every cluster)."""
    parts = {
        "instance": instance_loss(p, q, p_n, q_n),
        "assignment": assignment_loss(p, q, p_n, q_n, cluster_tau, columns),
        "center": center_loss(p, q, u, v, centers, cluster_tau, center_tau, columns),
    }
    parts["balance"], marginal = balance_loss(p, q, prior)
    loss = (
        w_instance * parts["instance"]
        + w_assignment * parts["assignment"]
        + w_center * parts["center"]
        + w_balance * parts["balance"]
    )
    return loss, parts, marginal


def fused_step(
    logits_i: Tensor, logits_t: Tensor, u: Tensor, v: Tensor,
    centers: Optional[Tensor] = None, prior: Optional[Tensor] = None, *,
    cluster_tau: float, center_tau: float, w_instance: float, w_assignment: float, w_center: float, w_balance: float,
) -> StepResult:
    """The fused step's definition: softmax of both heads' logits [2B, K] (the batch,
    then its neighbours), then `stage1_loss` (autograd gives the gradients); `prior` [K]
    or None (uniform) is the balance term's cluster prior (`balance_loss`)."""
    b = u.shape[0]
    probs_i, probs_t = torch.softmax(logits_i, 1), torch.softmax(logits_t, 1)
    p, p_n = probs_i.split(b)
    q, q_n = probs_t.split(b)
    loss, parts, marginal = stage1_loss(
        p, q, p_n, q_n, u, v, centers, prior, cluster_tau=cluster_tau, center_tau=center_tau,
        w_instance=w_instance, w_assignment=w_assignment, w_center=w_center, w_balance=w_balance,
    )
    return StepResult(loss, *(parts[k].detach() for k in PARTS), marginal, probs_i.detach(), probs_t.detach())
