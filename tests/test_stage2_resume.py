"""Stage 2 checkpoints: a run stopped after some epochs and resumed ends bit-identical to an
uninterrupted run; a checkpoint of another run or an unreadable file is refused; the
centres it returns are those of the tuned features under the final labels."""

import pytest
import torch
from torch.utils.data import DataLoader

from semclust import ops
from semclust.method import stage2
from semclust.config import Stage2Config
from semclust.inputs.sources import TensorSource, collate_skip
from semclust.method.heads import ClusterHead
from semclust.synthetic import SyntheticSpec, make_synthetic

K = 6


@pytest.fixture(scope="module")
def inputs():
    data = make_synthetic(SyntheticSpec(n=400, k=K, dim=32), seed=0)
    u = data.embeddings
    g = torch.Generator().manual_seed(1)
    labels = torch.as_tensor(data.labels, dtype=torch.long)
    noisy = torch.rand(u.shape[0], generator=g) < 0.3  # stage 1 is wrong on some samples
    labels = torch.where(noisy, torch.randint(K, labels.shape, generator=g), labels)
    conf = 0.3 + 0.7 * torch.rand(u.shape[0], generator=g)
    return u, labels, conf


def _train(inputs, epochs, seed=3, **kw):
    u, labels, conf = inputs
    cfg = Stage2Config(epochs=epochs, batch_size=32, min_per_cluster=2, adapter_hidden=16)
    torch.manual_seed(0)  # the same initial adapter and head for every run
    encoder = stage2.FeatureAdapter(u.shape[1], cfg)
    head = ClusterHead(u.shape[1], K, hidden=32)
    with ops.use_backend("torch"):
        return stage2.train_stage2(encoder, TensorSource(u), head, labels, conf, K, cfg, mode="adapter", seed=seed,
                                   progress=False, **kw)


def _assert_identical(a, b):
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.conf, b.conf)
    assert torch.equal(a.centers, b.centers)
    for x, y in zip(a.head.state_dict().values(), b.head.state_dict().values()):
        assert torch.equal(x, y)
    ta, tb = a.encoder.tail_parameters(1), b.encoder.tail_parameters(1)
    assert len(ta) == len(tb)
    for x, y in zip(ta, tb):
        assert torch.equal(x, y)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert [h["changed"] for h in a.history] == [h["changed"] for h in b.history]


def test_resume_equals_uninterrupted(inputs, tmp_path):
    whole = _train(inputs, 4)
    ck = tmp_path / "stage2.ckpt"
    first = _train(inputs, 2, checkpoint=ck)
    assert ck.exists() and len(first.history) == 2
    saved = torch.load(ck, weights_only=True)
    assert saved["epoch"] == 1 and len(saved["tuned"]) == len(first.encoder.tail_parameters(1))
    resumed = _train(inputs, 4, checkpoint=ck, resume=True)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    _assert_identical(whole, resumed)
    # training did move the model: the comparison is not between two untouched copies
    assert not torch.equal(first.head.state_dict()["net.0.weight"], whole.head.state_dict()["net.0.weight"])


def test_without_resume_a_checkpoint_is_overwritten_not_used(inputs, tmp_path):
    ck = tmp_path / "stage2.ckpt"
    _train(inputs, 2, checkpoint=ck)
    fresh = _train(inputs, 1, checkpoint=ck)
    assert len(fresh.history) == 1 and torch.load(ck, weights_only=True)["epoch"] == 0
    _assert_identical(fresh, _train(inputs, 1))


def test_checkpoint_of_another_run_is_refused(inputs, tmp_path):
    ck = tmp_path / "stage2.ckpt"
    _train(inputs, 1, checkpoint=ck)
    with pytest.raises(ValueError, match="another run"):
        _train(inputs, 2, seed=4, checkpoint=ck, resume=True)
    u, labels, conf = inputs
    with pytest.raises(ValueError, match="another run"):  # other stage-1 labels
        _train((u, (labels + 1) % K, conf), 2, checkpoint=ck, resume=True)


def test_unreadable_checkpoint_is_a_value_error_naming_the_file(inputs, tmp_path):
    ck = tmp_path / "stage2.ckpt"
    ck.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable stage-2 checkpoint") as err:
        _train(inputs, 2, checkpoint=ck, resume=True)
    assert str(ck) in str(err.value)


def test_centers_equal_center_update_of_the_tuned_features(inputs):
    r = _train(inputs, 2)
    u = inputs[0]
    # the tuned features on the plain view, batch by batch as stage 2 reads them
    source = TensorSource(u)
    source.transform = r.encoder.view_transform("eval")
    loader = DataLoader(source, batch_size=32 * 4, shuffle=False, collate_fn=collate_skip)
    with torch.no_grad():
        feats = torch.cat([r.encoder.image_features(batch) for batch, _, _ in loader])
    assert r.centers.shape == (K, u.shape[1]) and r.centers.dtype == torch.float32
    with ops.use_backend("torch"):
        expected = ops.center_update(feats.float(), K, labels=r.labels)[0]
    assert torch.equal(r.centers, expected)
    # and the labels are the head's argmax on those features
    with torch.no_grad():
        assert torch.equal(r.head.eval()(feats).argmax(1), r.labels)
    # whichever backend the caller's dispatcher picks, the same centres up to rounding
    torch.testing.assert_close(r.centers, ops.center_update(feats.float(), K, labels=r.labels)[0])


def test_empty_cluster_keeps_a_zero_centre(inputs):
    u, labels, conf = inputs
    cfg = Stage2Config(epochs=0, batch_size=32)
    head = ClusterHead(u.shape[1], K + 2, hidden=32)
    with torch.no_grad():  # nothing is ever predicted as the last two clusters
        head.net[-1].bias[K:] = -1e4
    enc = stage2.FeatureAdapter(u.shape[1], cfg)
    r = stage2.train_stage2(enc, TensorSource(u), head, labels, conf, K + 2, cfg, mode="adapter", progress=False)
    used = torch.bincount(r.labels, minlength=K + 2) > 0
    assert not used[K:].any() and used.any()
    assert torch.equal(r.centers[~used], torch.zeros(int((~used).sum()), u.shape[1]))
    torch.testing.assert_close(r.centers[used].norm(dim=1), torch.ones(int(used.sum())))
