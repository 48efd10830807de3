"""The synthetic generators: the legacy set is pinned, the realistic scenarios have the
statistics their docstring promises (modality gap, hierarchy, long tail, many classes)."""

import hashlib

import numpy as np
import pytest
import torch

from semclust.synthetic import SyntheticSpec, make_synthetic

# Computed from make_synthetic(SyntheticSpec(), seed=0) before the scenarios were added.
# The integer and string hashes are exact; the float values are checked to 1e-6 so a
# different CPU's last-bit rounding in normalise() cannot fail them, while any change to
# the generator (one extra random draw shifts everything) does.
_LABELS_SHA = "dd35a5a2be806c2dfb27025f38843b0e994d8e1c294a640ed8d909dcc9d640a1"
_NOUNS_SHA = "8f58e04d1c27ab00db80c2789716040ed8c17b3ecbca2142dd1a7b5f4209518f"
_RAW_ROWS, _RAW_COLS = [0, 1, 777, 2500, 4999], [0, 5, 63, 64, 127]
_RAW = [
    [0.2644086480140686, -0.5613025426864624, -0.06452622264623642, -0.21798309683799744, 0.052139945328235626],
    [0.034915708005428314, 0.5508416891098022, -0.09118752181529999, -0.1917002946138382, 0.056897442787885666],
    [-0.21163693070411682, -0.21045342087745667, 0.5950701832771301, -0.15979662537574768, 0.016469664871692657],
    [-0.2533304989337921, 0.1927221119403839, -0.10113491117954254, 0.04263773560523987, 0.03211629018187523],
    [-0.046001456677913666, -0.13637536764144897, -0.6505447626113892, -0.3415929973125458, -0.39733222126960754],
]
_NOUN_ROWS, _NOUN_COLS = [0, 79, 80, 109, 509], [0, 31, 63]
_NOUN = [
    [-0.11638928204774857, -0.1085418313741684, -0.015034009702503681],
    [-0.11220333725214005, 0.25690844655036926, -0.1778515875339508],
    [-0.06348171830177307, 0.12627993524074554, -0.03634345531463623],
    [-0.017221909016370773, 0.037936676293611526, 0.04710990935564041],
    [-0.14494511485099792, -0.05331744626164436, 0.05830082669854164],
]
_EMB_ROWS, _EMB_COLS = [3, 1234, 4998], [0, 1, 62]
_EMB = [
    [0.0396285243332386, -0.03200514614582062, 0.12591072916984558],
    [-0.09469936043024063, -0.06206319108605385, 0.06212878227233887],
    [-0.2000201940536499, -0.03716227412223816, -0.010615019127726555],
]
_SUMS = (3173.3420121682284, 130531.63918919489, 3264.560305553975, 31999.67290361326)


def _sha(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def test_make_synthetic_default_is_pinned():
    d = make_synthetic(SyntheticSpec(), seed=0)
    assert d.raw.shape == (5000, 128) and d.raw.dtype == torch.float32
    assert d.embeddings.shape == (5000, 64) and d.noun_embeddings.shape == (510, 64)
    assert d.labels.dtype == np.int64
    assert _sha(d.labels) == _LABELS_SHA
    assert hashlib.sha256("\n".join(d.nouns).encode()).hexdigest() == _NOUNS_SHA
    assert d.nouns[0] == "class0-noun0" and d.nouns[80] == "class0-part0" and d.nouns[110] == "distractor0"
    np.testing.assert_allclose(d.raw[_RAW_ROWS][:, _RAW_COLS].numpy(), _RAW, rtol=0, atol=1e-6)
    np.testing.assert_allclose(d.noun_embeddings[_NOUN_ROWS][:, _NOUN_COLS].numpy(), _NOUN, rtol=0, atol=1e-6)
    np.testing.assert_allclose(d.embeddings[_EMB_ROWS][:, _EMB_COLS].numpy(), _EMB, rtol=0, atol=1e-6)
    sums = (
        float(d.raw.double().sum()), float(d.raw.double().abs().sum()),
        float(d.noun_embeddings.double().abs().sum()), float(d.embeddings.double().abs().sum()),
    )
    np.testing.assert_allclose(sums, _SUMS, rtol=1e-6)


# ----------------------------------------------------------------------------------------
# realistic scenarios
# ----------------------------------------------------------------------------------------

from semclust import ops  # noqa: E402
from semclust.metrics import cluster_accuracy  # noqa: E402
from semclust.synthetic import SCENARIOS, ScenarioSpec, make_scenario  # noqa: E402


def _owner(nouns):
    """Class id a noun is named after ("class{k}-..."), -1 for style nouns and distractors."""
    return np.array([int(w.split("-")[0][5:]) if w.startswith("class") else -1 for w in nouns])


@pytest.fixture(scope="module")
def gap():
    return make_scenario("gap", seed=0)


def test_balanced_scenario_is_make_synthetic():
    a = make_scenario("balanced", seed=3, n=700)
    b = make_synthetic(SyntheticSpec(n=700), seed=3)
    assert torch.equal(a.raw, b.raw) and torch.equal(a.embeddings, b.embeddings)
    assert torch.equal(a.noun_embeddings, b.noun_embeddings)
    assert np.array_equal(a.labels, b.labels) and a.nouns == b.nouns
    assert a.spec == b.spec  # the legacy SyntheticSpec, as make_synthetic returns it
    assert SCENARIOS["balanced"].legacy_spec() == SyntheticSpec()


def test_gap_statistics(gap):
    u, t, y = gap.embeddings, gap.noun_embeddings, gap.labels
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, len(y), (2, 20000))
    keep = i != j
    pair = float((u[i[keep]] * u[j[keep]]).sum(1).mean())
    assert 0.45 <= pair <= 0.65, pair

    owner = _owner(gap.nouns)
    named = owner >= 0
    sims = (u[:2000] @ t[named].T).numpy()
    own = owner[named][None, :] == y[:2000, None]
    matched, unmatched = float(sims[own].mean()), float(sims[~own].mean())
    assert 0.2 <= matched <= 0.38, matched
    assert 0.0 < matched - unmatched <= 0.1, (matched, unmatched)


def test_gap_nuisance_beats_class_for_image_kmeans(gap):
    spec = gap.spec
    for s in SCENARIOS.values():
        if s.generator == "realistic":  # the nuisance outweighs the class on average
            assert s.style_scale > 1.2 * s.class_scale
    labels = ops.kmeans(gap.embeddings, spec.k, seed=0, restarts=1).labels
    assert cluster_accuracy(gap.labels, labels) < 0.35


def test_hidden_evidence_is_invisible_to_the_frozen_encoder(gap):
    d = gap.spec.dim
    raw = gap.raw[:500].clone()
    before = gap.encoder.image_features(raw)
    raw[:, d:] = torch.randn(500, d)
    assert torch.equal(gap.encoder.image_features(raw), before)
    # ... but it carries the class: nearest class mean on x_hidden alone is far above chance
    hidden, y = gap.raw[:, d:], torch.from_numpy(gap.labels)
    means = torch.stack([hidden[y == k].mean(0) for k in range(gap.spec.k)])
    assert (torch.cdist(hidden, means).argmin(1) == y).float().mean() > 0.6


def test_superclass_nouns_name_subclasses():
    s = make_scenario("superclass", seed=0)
    assert s.spec.k == 20 and s.spec.subclasses == 4
    assert sorted(np.unique(s.labels).tolist()) == list(range(20))
    named = [w for w in s.nouns if w.startswith("class")]
    assert named and all("-sub" in w for w in named)  # no noun names a superclass
    subs = {tuple(w.split("-")[:2]) for w in named}
    assert len(subs) == 20 * 4


@pytest.mark.parametrize("name, ratio", [("longtail10", 10.0), ("longtail100", 100.0)])
def test_long_tail_ratio(name, ratio):
    s = make_scenario(name, seed=0)
    sizes = np.bincount(s.labels, minlength=s.spec.k)
    assert sizes.min() > 0
    assert abs(sizes.max() / sizes.min() / ratio - 1) <= 0.15, sizes


def test_k100_all_classes_present():
    s = make_scenario("k100", seed=0)
    assert s.embeddings.shape == (10000, 64)
    sizes = np.bincount(s.labels, minlength=100)
    assert len(sizes) == 100 and sizes.min() > 0


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_scenario_is_well_formed(name):
    s = make_scenario(name, seed=1, n=600)
    k = s.spec.k
    assert s.raw.shape == (600, 128) and s.embeddings.shape == (600, 64)
    assert s.labels.dtype == np.int64 and s.labels.min() >= 0 and s.labels.max() < k
    assert len(s.nouns) == s.noun_embeddings.shape[0] == len(set(s.nouns))
    torch.testing.assert_close(s.embeddings.norm(dim=1), torch.ones(600))
    torch.testing.assert_close(s.noun_embeddings.norm(dim=1), torch.ones(len(s.nouns)))
    assert any(w.startswith("distractor") for w in s.nouns)
    if name != "balanced":
        assert isinstance(s.spec, ScenarioSpec) and s.spec.n == 600
        assert any(w.startswith("style") for w in s.nouns)
    with pytest.raises(Exception):  # frozen
        SCENARIOS[name].k = 3


def test_defaults_n_and_dim():
    assert SCENARIOS["gap"].n == 5000 and SCENARIOS["k100"].n == 10000 and SCENARIOS["k200"].n == 20000
    assert all(s.dim == 64 for s in SCENARIOS.values())
    s = make_scenario("gap", seed=0, n=800, dim=32)
    assert s.raw.shape == (800, 64) and s.noun_embeddings.shape[1] == 32 and s.spec.dim == 32


def test_deterministic_per_name_and_seed():
    a, b = make_scenario("gap", seed=5, n=500), make_scenario("gap", seed=5, n=500)
    assert torch.equal(a.raw, b.raw) and torch.equal(a.noun_embeddings, b.noun_embeddings)
    assert np.array_equal(a.labels, b.labels)
    c = make_scenario("gap", seed=6, n=500)
    assert not torch.equal(a.raw, c.raw)
    d = make_scenario("longtail10", seed=5, n=500)
    assert not torch.equal(a.noun_embeddings, d.noun_embeddings)


def test_unknown_scenario_lists_the_names():
    with pytest.raises(ValueError) as e:
        make_scenario("nope")
    for name in SCENARIOS:
        assert name in str(e.value)


def test_bad_sizes_raise():
    with pytest.raises(ValueError):
        make_scenario("k100", n=50)  # fewer images than classes
    with pytest.raises(ValueError):
        make_scenario("gap", dim=4)
