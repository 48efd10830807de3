"""Config sections check every option when built (Python or JSON) and when assigned."""

import dataclasses
import json

import pytest

from semclust.config import Config, NeighbourConfig, Stage1Config, Stage2Config


@pytest.mark.parametrize("build,error,message", [
    (lambda: Stage1Config(balance="dynamc"), ValueError, r"^stage1.balance must be one of \['dynamic', 'fixed'\]"),
    (lambda: Stage1Config(predict_with="text"), ValueError, "stage1.predict_with must be one of"),
    (lambda: Stage1Config(epochs=-1), ValueError, "stage1.epochs must be >= 0"),
    (lambda: Stage1Config(epochs=2.5), TypeError, "stage1.epochs must be an int"),
    (lambda: Stage1Config(lr=0.0), ValueError, "stage1.lr must be > 0"),
    (lambda: Stage1Config(lr=True), TypeError, "stage1.lr must be a number"),
    (lambda: Stage1Config(lr=10**400), ValueError, "stage1.lr must be a finite number"),  # no OverflowError
    (lambda: Stage1Config(center_target="yes"), TypeError, "stage1.center_target must be True or False"),
    (lambda: Stage2Config(confident_fraction=1.5), ValueError, "stage2.confident_fraction must be <= 1"),
    (lambda: NeighbourConfig(method="hnsw"), ValueError, "neighbours.method must be one of"),
    (lambda: NeighbourConfig(k=float("nan")), TypeError, "neighbours.k must be an int"),
])
def test_bad_values_raise_at_construction(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_assignment_is_checked_too():
    cfg = Config()
    cfg.stage1.epochs = 3
    with pytest.raises(ValueError, match="balance must be one of"):
        cfg.stage1.balance = "bogus"
    assert cfg.stage1.balance == "dynamic"
    with pytest.raises(AttributeError, match="no option 'epoch'"):
        cfg.stage1.epoch = 3
    with pytest.raises(ValueError, match="must be one of"):
        dataclasses.replace(cfg.neighbours, method="flat")


def test_json_is_checked_like_python():
    good = Config.from_dict(json.loads('{"stage1": {"epochs": 2, "lr": 1}, "neighbours": {"k": 7}}'))
    assert good.stage1.epochs == 2 and good.stage1.lr == 1 and good.neighbours.k == 7
    assert Config.from_dict(Config().to_dict()) == Config()
    with pytest.raises(ValueError, match="balance must be one of"):
        Config.from_dict({"stage1": {"balance": "bogus"}})
    with pytest.raises(ValueError, match="unknown keys \\['knn_k'\\]"):
        Config.from_dict({"stage1": {"knn_k": 5}})
    with pytest.raises(ValueError, match="unknown config sections"):
        Config.from_dict({"stage3": {}})
    with pytest.raises(TypeError, match="Config.stage1 must be a Stage1Config"):
        Config(stage1={"epochs": 2})


@pytest.mark.parametrize("given,error,message", [
    # each used to pass the checks or end in ZeroDivisionError / "range() arg 3 must not be zero" mid-fit
    ([1, 2], TypeError, "a config must be a dict of sections"),
    ({"stage1": {"epochs": "ten"}}, TypeError, "stage1.epochs must be an int, got 'ten'"),
    ({"stage1": {"epochs": -1}}, ValueError, "stage1.epochs must be >= 0"),
    ({"stage1": {"batch_size": 0}}, ValueError, "stage1.batch_size must be >= 2, got 0"),
    ({"stage2": {"batch_size": 1}}, ValueError, "stage2.batch_size must be >= 2, got 1"),
    ({"neighbours": {"k": 0}}, ValueError, "neighbours.k must be >= 1, got 0"),
    ({"chunks": {"assign": 0}}, ValueError, "chunks.assign must be >= 1, got 0"),
    ({"stage1": {"balance": "bogus"}}, ValueError, "stage1.balance must be one of ['dynamic', 'fixed'], got 'bogus'"),
    ({"stage1": {"center_target": 1}}, TypeError, "stage1.center_target must be True or False, got 1"),
    ({"stage1": {"center_target": "true"}}, TypeError, "stage1.center_target must be True or False"),
    ({"stage1": {"lr": True}}, TypeError, "stage1.lr must be a number, got True"),
    ({"stage1": [1]}, TypeError, "config section 'stage1' must be a dict"),
    ({"stage1": None}, TypeError, "config section 'stage1' must be a dict"),
    ({"stage1": {"epochs": 1, 2: 3}}, ValueError, "unknown keys [2]"),  # a mixed-type key set still sorts
])
def test_json_values_raise_naming_the_dotted_option(given, error, message):
    with pytest.raises(error) as exc:
        Config.from_dict(given)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_sections_are_checked_when_assigned():
    cfg = Config()
    with pytest.raises(TypeError, match="Config.stage1 must be a Stage1Config, got dict"):
        cfg.stage1 = {"epochs": 2}
    with pytest.raises(AttributeError, match="no section 'stage3'"):
        cfg.stage3 = Stage1Config()
    cfg.stage1 = Stage1Config(epochs=3)
    assert cfg.stage1.epochs == 3
