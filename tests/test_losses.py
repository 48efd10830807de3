import math

import pytest
import torch
from torch.autograd import gradcheck

from semclust.method import losses
from semclust.ops import reference as R
from semclust.config import Stage2Config
from semclust.method.stage2 import select_confident


def _probs(b, k, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, k, generator=g, dtype=dtype), 1)


def _naive_cluster_infonce(a, b, tau):
    k = a.shape[1]
    z = [col / col.norm() for col in torch.cat([a.T, b.T])]
    total = 0.0
    for i in range(2 * k):
        pos = (i + k) % (2 * k)
        num = math.exp(float(z[i] @ z[pos]) / tau)
        den = sum(math.exp(float(z[i] @ z[j]) / tau) for j in range(2 * k) if j != i)
        total += -math.log(num / den)
    return total / (2 * k)


def test_cluster_infonce_matches_naive_formula():
    a, b = _probs(9, 4, 0), _probs(9, 4, 1)
    assert R.cluster_infonce(a, b, 0.5).item() == pytest.approx(_naive_cluster_infonce(a, b, 0.5), rel=1e-9)


def test_cluster_infonce_rewards_agreement():
    a = _probs(64, 5, 0)
    assert R.cluster_infonce(a, a, 0.5) < R.cluster_infonce(a, _probs(64, 5, 1), 0.5)


def test_instance_loss_matches_formula_and_is_zero_for_identical_one_hots():
    p, q, pn, qn = (_probs(7, 3, s) for s in range(4))
    want = -torch.log((p * q).sum(1)).mean() - 0.5 * (torch.log((p * qn).sum(1)).mean() + torch.log((q * pn).sum(1)).mean())
    assert R.instance_loss(p, q, pn, qn).item() == pytest.approx(want.item(), rel=1e-12)
    one = torch.eye(3, dtype=torch.float64)[[0, 1, 2, 0]]
    assert R.instance_loss(one, one, one, one).item() == pytest.approx(0.0, abs=1e-12)


def _kl(m, prior):
    return float(sum(mk * (math.log(mk) - math.log(pk)) for mk, pk in zip(m.tolist(), prior.tolist())))


def test_balance_loss_is_the_kl_of_both_marginals_to_the_prior():
    p, q = _probs(11, 5, 0), _probs(11, 5, 1)
    prior = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    uniform = torch.full((5,), 0.2, dtype=torch.float64)
    for given, want_prior in ((prior, prior), (None, uniform)):
        loss, marginal = R.balance_loss(p, q, given)
        assert loss.item() == pytest.approx(_kl(p.mean(0), want_prior) + _kl(q.mean(0), want_prior), rel=1e-12)
        assert torch.allclose(marginal, 0.5 * (p.mean(0) + q.mean(0)))


def test_balance_loss_is_zero_exactly_at_the_prior():
    k = 6
    uniform = torch.full((12, k), 1.0 / k, dtype=torch.float64)
    skewed = torch.softmax(torch.arange(k, dtype=torch.float64).repeat(12, 1), 1)
    assert R.balance_loss(uniform, uniform, None)[0].item() == pytest.approx(0.0, abs=1e-12)
    assert R.balance_loss(skewed, skewed, None)[0] > 0.1
    # a long-tailed prior: the skewed marginal is the optimum, the uniform one is not
    assert R.balance_loss(skewed, skewed, skewed[0])[0].item() == pytest.approx(0.0, abs=1e-12)
    assert R.balance_loss(uniform, uniform, skewed[0])[0] > 0.1


def test_balance_prior_is_an_ema_mixed_with_uniform():
    state = losses.BalancePrior.uniform(3, momentum=0.5, mix=0.25)
    state.update(torch.tensor([0.8, 0.15, 0.05]))
    shares = torch.tensor([0.5 / 3 + 0.4, 0.5 / 3 + 0.075, 0.5 / 3 + 0.025])
    assert torch.allclose(state.shares, shares)
    prior = state.prior()
    assert torch.allclose(prior, 0.75 * shares + 0.25 / 3)
    assert prior.sum().item() == pytest.approx(1.0)
    # a cluster whose share vanished keeps mix / K of prior mass: it is pulled back
    state.shares = torch.tensor([0.6, 0.4, 0.0])
    assert state.prior()[2].item() == pytest.approx(0.25 / 3)
    assert torch.allclose(state.prior(mix=1.0), torch.full((3,), 1 / 3))


def test_cluster_columns_restrict_the_infonce_terms_to_those_clusters():
    """With `columns`, the assignment term is the naive InfoNCE of the chosen columns and
    the centre term's InfoNCE compares only those centre pairs; the other terms are the
    full-K ones."""
    b, k, d = 9, 6, 5
    p, q, pn, qn = (_probs(b, k, s) for s in range(4))
    g = torch.Generator().manual_seed(7)
    u, v = (torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1) for _ in "uv")
    cols = torch.tensor([4, 1, 3])
    got = R.assignment_loss(p, q, pn, qn, 0.5, cols).item()
    want = 0.5 * (_naive_cluster_infonce(p[:, cols], qn[:, cols], 0.5) + _naive_cluster_infonce(q[:, cols], pn[:, cols], 0.5))
    assert got == pytest.approx(want, rel=1e-9)
    ci = torch.nn.functional.normalize(p[:, cols].T @ u, dim=1)
    ct = torch.nn.functional.normalize(q[:, cols].T @ v, dim=1)
    logits = ci @ ct.T / 0.5
    ce = lambda m: -torch.log_softmax(m, 1).diagonal().mean()  # noqa: E731
    assert R.center_loss(p, q, u, v, None, 0.5, 0.1, cols).item() == pytest.approx(0.5 * (ce(logits) + ce(logits.T)).item(), rel=1e-9)
    kw = dict(cluster_tau=0.5, center_tau=0.1, w_instance=0.5, w_assignment=1.0, w_center=3.0, w_balance=2.0)
    _, full, _ = R.stage1_loss(p, q, pn, qn, u, v, None, None, **kw)
    _, sub, _ = R.stage1_loss(p, q, pn, qn, u, v, None, None, columns=cols, **kw)
    assert sub["instance"] == full["instance"] and sub["balance"] == full["balance"]
    assert sub["assignment"].item() == pytest.approx(got, rel=1e-12)
    assert abs(sub["assignment"].item() - full["assignment"].item()) > 1e-3  # the subset matters
    # every column is the full loss
    assert R.assignment_loss(p, q, pn, qn, 0.5, torch.arange(k)).item() == pytest.approx(full["assignment"].item(), rel=1e-12)


@pytest.mark.parametrize("name", ["instance", "assignment", "center", "balance", "assignment-columns",
                                  "center-columns"])
def test_loss_gradients_float64(name):
    b, k, d = 6, 3, 4
    g = torch.Generator().manual_seed(3)
    logits = [torch.randn(b, k, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    u = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    v = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)

    def f(*ls):
        p, q, pn, qn = (torch.softmax(x, 1) for x in ls)
        if name == "instance":
            return R.instance_loss(p, q, pn, qn)
        if name == "assignment":
            return R.assignment_loss(p, q, pn, qn, 0.5)
        if name == "center":
            return R.center_loss(p, q, u, v, None, 0.5, 0.1)
        if name == "assignment-columns":
            return R.assignment_loss(p, q, pn, qn, 0.5, torch.tensor([2, 0]))
        if name == "center-columns":
            return R.center_loss(p, q, u, v, None, 0.5, 0.1, torch.tensor([2, 0]))
        return R.balance_loss(p, q, None)[0]

    assert gradcheck(f, tuple(logits))


def test_center_target_pulls_heads_towards_the_text_space_centres():
    # the image features point the other way: only the counterparts v decide the target
    v = torch.tensor([[1.0, 0, 0]] * 4 + [[0, 1.0, 0]] * 4)
    u = v.flip(0)
    centers = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    agree = torch.tensor([[0.99, 0.01]] * 4 + [[0.01, 0.99]] * 4)
    disagree = agree.flip(1)

    def target_term(p):
        return R.center_loss(p, p, u, v, centers, 0.5, 0.1) - R.center_loss(p, p, u, v, None, 0.5, 0.1)

    assert target_term(agree) < target_term(disagree)
    # the term is -1/2 mean_i sum_k T_ik (log p_ik + log q_ik), T = softmax(v c^T / 0.1)
    t = torch.softmax(v @ centers.T / 0.1, 1)
    assert target_term(agree).item() == pytest.approx(-(t * agree.log()).sum(1).mean().item(), rel=1e-5)


def test_update_centers_uses_confident_members_and_ema():
    v = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    p = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55]])
    c = losses.update_centers(None, p, p, v, momentum=0.9)
    # the two most confident rows (0.9, 0.8) alone define the centres
    assert torch.allclose(c, torch.nn.functional.normalize(torch.tensor([[0.9, 0.2], [0.1, 0.8]]), dim=1), atol=1e-6)
    prev = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    c2 = losses.update_centers(prev, p, p, v, momentum=0.9)
    # kept masses 1.1 and 0.9 (mean 1.0): momentum 0.9 ** 1.1 and 0.9 ** 0.9
    m = torch.tensor([[0.9**1.1], [0.9**0.9]])
    want = torch.nn.functional.normalize(m * prev + (1 - m) * c, dim=1)
    assert torch.allclose(c2, want, atol=1e-6)


def test_update_centers_leaves_a_starving_centre_where_it_is():
    # cluster 2 has almost no mass in the batch: its weighted batch mean is the batch's
    # mean direction, and a plain EMA would drag it there by (1 - momentum) every step
    g = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.eye(3)[torch.arange(64) % 2] + 0.01 * torch.randn(64, 3, generator=g), dim=1)
    p = torch.full((64, 3), 1e-4)
    p[torch.arange(64), torch.arange(64) % 2] = 1 - 2e-4
    prev = torch.eye(3)
    c = prev
    for _ in range(50):
        c = losses.update_centers(c, p, p, v, momentum=0.9)
    assert float(c[2] @ prev[2]) > 0.99
    assert float(c[0] @ prev[0]) > 0.99 and float(c[1] @ prev[1]) > 0.99


def test_initial_centers_are_the_counterparts_kmeans():
    g = torch.Generator().manual_seed(0)
    blobs = torch.eye(4)[torch.arange(40) % 4] + 0.05 * torch.randn(40, 4, generator=g)
    v = torch.nn.functional.normalize(blobs, dim=1)
    c = losses.initial_centers(v, 4, seed=0)
    assert c.shape == (4, 4)
    # one centre per blob
    assert sorted(c.argmax(1).tolist()) == [0, 1, 2, 3]


def test_select_confident_is_class_balanced():
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.zeros(90, dtype=torch.long), torch.ones(10, dtype=torch.long), torch.full((3,), 2)])
    conf = torch.rand(103, generator=g)
    cfg = Stage2Config(confident_fraction=0.5, min_per_cluster=5)
    sel, w = select_confident(labels, conf, 4, cfg)
    counts = torch.bincount(labels[sel], minlength=4)
    assert counts.tolist() == [45, 5, 3, 0]
    per = torch.zeros(4, dtype=w.dtype).index_add(0, labels[sel], w)
    assert torch.allclose(per[:3], per[:3].mean().expand(3))
    # the kept samples of a cluster are its most confident ones
    kept0 = conf[sel[labels[sel] == 0]]
    assert kept0.min() >= conf[labels == 0].topk(45).values.min()


def test_similarity_spread_is_scale_free_in_the_cone():
    # the same directions squeezed into a narrow cone around a common mean: the spread
    # shrinks with the cone, so tau = c x spread gives the same target sharpness
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(200, 16, generator=g), dim=1)
    mean = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    wide, narrow = (torch.nn.functional.normalize(mean + s * dirs, dim=1) for s in (3.0, 0.2))
    c_wide, c_narrow = wide[:5], narrow[:5]
    s_wide, s_narrow = losses.similarity_spread(wide, c_wide), losses.similarity_spread(narrow, c_narrow)
    assert s_narrow < 0.25 * s_wide
    want = float((wide @ c_wide.T).std(1).mean())
    assert s_wide == pytest.approx(want, rel=1e-6)
    # a strided sample of rows
    assert losses.similarity_spread(wide, c_wide, sample=50) == pytest.approx(float((wide[::4] @ c_wide.T).std(1).mean()), rel=1e-6)


def test_center_temperature_is_spread_units_up_to_ten_clusters_then_shrinks_with_k():
    g = torch.Generator().manual_seed(3)
    v = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    for k in (2, 10, 40, 200):
        c = v[:k]
        want = 2.0 * float((v @ c.T).std(1).mean()) * min(1.0, 10 / k)
        assert losses.center_temperature(v, c, 2.0) == pytest.approx(want, rel=1e-6)


def test_center_target_keeps_its_top_one_mass_as_k_grows():
    # in plain spread units the target of 200 well separated centres is ~uniform
    g = torch.Generator().manual_seed(4)
    top1 = {}
    for k in (10, 200):
        c = torch.nn.functional.normalize(torch.randn(k, 32, generator=g), dim=1)
        v = torch.nn.functional.normalize(c[torch.arange(2000) % k] + 0.15 * torch.randn(2000, 32, generator=g), dim=1)
        for name, tau in (("spread", 2.0 * losses.similarity_spread(v, c)), ("rule", losses.center_temperature(v, c, 2.0))):
            top1[name, k] = float(torch.softmax(v @ c.T / tau, 1).max(1).values.mean())
    assert top1["spread", 200] < 0.1
    assert top1["rule", 200] >= top1["rule", 10] == top1["spread", 10]
