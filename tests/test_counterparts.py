"""Text counterparts: the per-image top-k retrieval against an independent formula, and
the two noun-selection recipes."""

import pytest
import torch
from torch.nn import functional as F

from semclust.config import CounterpartConfig, SemanticSpaceConfig
from semclust.method import counterparts


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def _naive(u, bank, tau, top):
    out = []
    for x in u:
        s = bank @ x
        idx = sorted(range(len(s)), key=lambda j: -float(s[j]))[:top]
        w = torch.softmax(torch.stack([s[j] for j in idx]) / tau, 0)
        out.append(F.normalize(sum(wj * bank[j] for wj, j in zip(w, idx)), dim=0))
    return torch.stack(out)


@pytest.mark.parametrize("top,tau", [(1, 0.01), (7, 0.01), (50, 0.005), (3, 1.0)])
def test_per_image_top_nouns_match_the_formula(top, tau):
    u, bank = _unit(37, 9, seed=1).float(), _unit(23, 9, seed=2).float()
    got = counterparts.text_counterparts(u, bank, CounterpartConfig(tau=tau, per_image=top))
    want = _naive(u.double(), bank.double(), tau, min(top, 23)).float()
    assert got.shape == u.shape and got.dtype == u.dtype
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_per_image_zero_is_the_softmax_over_the_whole_bank():
    u, bank = _unit(20, 8, seed=3).float(), _unit(15, 8, seed=4).float()
    all_ = counterparts.text_counterparts(u, bank, CounterpartConfig(tau=0.05, per_image=0))
    want = F.normalize(torch.softmax(u @ bank.T / 0.05, 1) @ bank, dim=1)
    torch.testing.assert_close(all_, want, atol=1e-5, rtol=0)
    # keeping every noun is the same as per_image = 0
    torch.testing.assert_close(counterparts.text_counterparts(u, bank, CounterpartConfig(tau=0.05, per_image=15)), want,
                               atol=1e-5, rtol=0)


def test_chunks_do_not_change_the_counterparts():
    from semclust.config import ChunkConfig

    u, bank = _unit(300, 8, seed=5).float(), _unit(40, 8, seed=6).float()
    cfg = CounterpartConfig(per_image=5)
    a = counterparts.text_counterparts(u, bank, cfg)
    b = counterparts.text_counterparts(u, bank, cfg, ChunkConfig(retrieve=17, knn_queries=5, knn_database=7))
    # float32 scores differ by ~1e-7 between GEMM blockings; / tau = 0.01 makes that 1e-5
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_pool_keeps_each_centres_top_nouns():
    # three tight image blobs; nouns: 4 near each blob, and far ones
    g = torch.Generator().manual_seed(0)
    axes = torch.eye(6)[:3]
    u = F.normalize(axes[torch.arange(90) % 3] + 0.05 * torch.randn(90, 6, generator=g), dim=1)
    near = F.normalize(axes.repeat_interleave(4, 0) + 0.1 * torch.randn(12, 6, generator=g), dim=1)
    far = F.normalize(torch.eye(6)[3:].repeat(5, 1) + 0.1 * torch.randn(15, 6, generator=g), dim=1)
    nouns = torch.cat([near, far])
    space = counterparts.select_nouns(u, nouns, 3, SemanticSpaceConfig(pool_per_centre=4, kmeans_restarts=1))
    assert space.centers.shape[0] == 3  # one centre per cluster sought
    assert space.noun_index.tolist() == list(range(12))


def test_tac_selection_ranks_voters_by_probability():
    # one centre; nouns all vote for it: the kept ones are the most probable (here: nearest)
    u = F.normalize(torch.tensor([[1.0, 0.0, 0.0]]).repeat(10, 1) + 0.01 * torch.randn(10, 3), dim=1)
    nouns = F.normalize(torch.tensor([[1.0, 0.9, 0.0], [1.0, 0.1, 0.0], [1.0, 0.5, 0.0], [1.0, 0.0, 0.3]]), dim=1)
    cfg = SemanticSpaceConfig(method="tac", nouns_per_centre=2, images_per_centre=100, kmeans_restarts=1, noun_tau=1.0)
    space = counterparts.select_nouns(u, nouns, 1, cfg)
    assert space.noun_index.tolist() == [1, 3]
