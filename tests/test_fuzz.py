"""Property-based fuzzing of everything that reads untrusted input: `Config.from_dict`,
the model-directory schema (`semclust.model.check_meta`, `read`, `build`), the command
line (`semclust.cli.main`) and `SemanticClusterer`'s parameter checks. Each may accept
or refuse its input, refusing with one line (ValueError / TypeError, or exit code 1-2
for the CLI), never another exception or a traceback.

The "ci" profile (the default; HYPOTHESIS_PROFILE=dev explores afresh each run) is
derandomized, so a CI run is reproducible, and has no deadline: a shared CI machine's
timing is noise. The example counts keep this file to a few seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from semclust import model as fitted
from semclust.api import SemanticClusterer
from semclust.cli import main
from semclust.config import Config
from semclust.synthetic import SyntheticSpec, make_synthetic

settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# ---- strategies -----------------------------------------------------------------------------

# values JSON (or a careless Python caller) can hold, with the edge cases that used to
# crash: ints too large for a float, NaN / inf, bools where numbers belong
JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
                | st.sampled_from([0, -1, 1, 2, 10**400, -(10**400), 2**63, 0.5, 1e-300]) | st.text(max_size=6))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
SECTIONS = {name: type(section) for name, section in vars(Config()).items()}


def valid_value(f: Any) -> st.SearchStrategy:
    """A value the option `f` accepts, from its declared constraint."""
    m = f.metadata
    if m["choices"] is not None:
        return st.sampled_from(m["choices"])
    if m["kind"] is bool:
        return st.booleans()
    low, high = m["low"], m["high"]
    if m["kind"] is int:
        return st.integers(min_value=low, max_value=high if high is not None else (low or 0) + 10**6)
    return st.floats(min_value=low, max_value=high, exclude_min=m["low_open"] and low is not None,
                     allow_nan=False, allow_infinity=False)


VALID_CONFIGS = st.fixed_dictionaries({}, optional={
    name: st.fixed_dictionaries({}, optional={f.name: valid_value(f) for f in fields(kind)})
    for name, kind in SECTIONS.items()})
ANY_KEY = {name: st.sampled_from([f.name for f in fields(kind)]) | st.text(max_size=6) for name, kind in SECTIONS.items()}
HOSTILE_CONFIGS = JSON_VALUES | st.dictionaries(
    st.sampled_from(list(SECTIONS)) | st.text(max_size=6),
    JSON_VALUES | st.sampled_from(list(SECTIONS)).flatmap(
        lambda s: st.dictionaries(ANY_KEY[s], JSON_VALUES | valid_value(next(iter(fields(SECTIONS[s])))), max_size=4)),
    max_size=3)


def one_line(e: BaseException) -> None:
    assert str(e) and "\n" not in str(e), repr(e)


# ---- Config.from_dict -----------------------------------------------------------------------------


@settings(max_examples=200)
@given(VALID_CONFIGS)
def test_valid_configs_round_trip(d):
    cfg = Config.from_dict(d)
    out = cfg.to_dict()
    for section, values in d.items():
        assert all(out[section][k] == v for k, v in values.items())
    assert Config.from_dict(json.loads(json.dumps(out))) == cfg


@settings(max_examples=400)
@given(HOSTILE_CONFIGS)
def test_hostile_configs_raise_one_line_or_round_trip(d):
    try:
        cfg = Config.from_dict(d)
    except (ValueError, TypeError) as e:
        one_line(e)
    else:
        assert Config.from_dict(cfg.to_dict()) == cfg


# ---- the model directory --------------------------------------------------------------------------

META = {"format": fitted.MODEL_FORMAT, "weights_sha256": "0" * 64, "mode": "stage1", "dim": 16,
        "params": {"n_clusters": 3, "stage": 1, "seed": 0, "clip": None, "pretrained": None,
                   "checkpoint_sha256": None, "custom_encoder": None},
        "config": {}, "history": {}}
FIELDS = ["format", *fitted.SCHEMA]


def mutated(meta: dict, name: str, value: Any) -> dict:
    """`meta` with field `name` (dotted) set to `value`, or deleted when value is ...."""
    out = json.loads(json.dumps(meta))
    parent, _, key = name.rpartition(".")
    holder = out[parent] if parent else out
    if value is ...:
        holder.pop(key, None)
    else:
        holder[key] = value
    return out


def test_the_template_meta_is_valid():
    fitted.check_meta(META, "semclust.json")


@settings(max_examples=300)
@given(JSON_VALUES | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), JSON_VALUES, max_size=6))
def test_check_meta_on_random_json(meta):
    try:
        fitted.check_meta(meta, "semclust.json")
    except ValueError as e:
        one_line(e)
        assert str(e).startswith("invalid model file semclust.json: ")


@settings(max_examples=300)
@given(st.sampled_from(FIELDS), st.just(...) | JSON_VALUES)
def test_check_meta_names_the_field_it_refuses(name, value):
    try:
        fitted.check_meta(mutated(META, name, value), "semclust.json")
    except ValueError as e:
        one_line(e)
        assert f"field {name}" in str(e)  # a section's message may name one of its fields


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A saved stage-2 (adapter) model, and a scratch copy beside it per example."""
    data = make_synthetic(SyntheticSpec(n=90, k=3, dim=8, distractor_nouns=10), seed=0)
    cfg = Config.from_dict({"stage1": {"epochs": 1, "batch_size": 32, "hidden": 8}, "neighbours": {"k": 3},
                            "stage2": {"epochs": 1, "batch_size": 32, "min_per_cluster": 2, "adapter_hidden": 4},
                            "semantic": {"kmeans_restarts": 1, "kmeans_iters": 3}})
    model = SemanticClusterer(3, clip=None, stage=2, config=cfg, device="cpu")
    with torch.random.fork_rng(devices=[]):
        model.fit(data.embeddings.numpy(), nouns=data.noun_embeddings.numpy())
    return model.save(tmp_path_factory.mktemp("fuzz-model") / "run")


@settings(max_examples=80)
@given(st.data())
def test_read_and_build_an_edited_model_directory(model_dir, data):
    meta = json.loads((model_dir / fitted.CONFIG_FILE).read_text())
    name = data.draw(st.sampled_from(FIELDS + ["config"] + [f"config.{s}" for s in SECTIONS]))
    value = data.draw(st.just(...) | JSON_VALUES | (HOSTILE_CONFIGS if name.startswith("config") else st.nothing()))
    edited = model_dir.parent / "edited"
    shutil.rmtree(edited, ignore_errors=True)
    shutil.copytree(model_dir, edited)
    (edited / fitted.CONFIG_FILE).write_text(json.dumps(mutated(meta, name, value)))
    try:
        fitted.build(fitted.read(edited), torch.device("cpu"))
    except ValueError as e:
        one_line(e)


# ---- the command line -----------------------------------------------------------------------------


class Started(Exception):
    """Raised in place of the expensive work: every cheap check passed."""


def started(*args: Any, **kwargs: Any) -> None:
    raise Started


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-cli")
    np.save(root / "u.npy", np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32))
    (root / "bad.pt").write_bytes(b"\x80\x02corrupt")
    (root / "words.txt").write_text("cat\ndog\n")
    (root / "folder").mkdir()
    return root


OPTION_VALUES = (st.integers(-3, 2**40).map(str) | st.sampled_from(["0", "1", "2", "-1", "1e3", "nan", "", "--", "\x00"])
                 | st.text(max_size=4))
PATH = object()  # stands for a drawn path
# command -> (its required arguments, each PATH drawn, "{root}" the scratch folder; the options fuzzed,
# path-valued ones as PATH)
CLI = {
    "demo": ([], {"--n": OPTION_VALUES, "-k": OPTION_VALUES, "--epochs": OPTION_VALUES, "--stage2-epochs": OPTION_VALUES,
                  "--seed": OPTION_VALUES, "--json": PATH}),
    "fit": ([PATH, "-k", "3", "--out", "{root}/run"], {"-k": OPTION_VALUES, "--epochs": OPTION_VALUES, "--seed": OPTION_VALUES,
                                                "--stage": OPTION_VALUES, "--nouns": PATH, "--config": HOSTILE_CONFIGS}),
    "predict": (["{root}/run", PATH, "--out", "{root}/out.npy"], {"--out": PATH, "--seed": OPTION_VALUES}),
    "evaluate": (["{root}/run", "--labels", "{root}/u.npy"], {"--labels": PATH, "--predictions": PATH, "--grid": PATH, "--images": PATH}),
    "embed": ([PATH, "--out", "{root}/store"], {"--batch-size": OPTION_VALUES, "--workers": OPTION_VALUES,
                                         "--shard-rows": OPTION_VALUES, "--seed": OPTION_VALUES}),
}


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_cli_refuses_bad_options_in_one_line(cli_files, data):
    root = cli_files
    paths = st.sampled_from([str(root / name) for name in ("u.npy", "bad.pt", "words.txt", "folder", "missing.npy")]
                            + ["default", "", "\x00"])
    command = data.draw(st.sampled_from(sorted(CLI)))
    required, options = CLI[command]
    # the required arguments come first: argparse keeps an option's last value, so a fuzzed one overrides them
    argv = [command] + [data.draw(paths) if a is PATH else a.format(root=root) for a in required]
    for option in data.draw(st.lists(st.sampled_from(sorted(options)), unique=True)):
        value = data.draw(paths if options[option] is PATH else options[option])
        if option == "--config":
            (root / "cfg.json").write_text(json.dumps(value))
            value = str(root / "cfg.json")
        argv += [option, value]
    err = io.StringIO()
    with (mock.patch("semclust.synthetic.make_synthetic", started), mock.patch.object(SemanticClusterer, "fit", started),
          mock.patch.object(SemanticClusterer, "load", classmethod(started)),
          mock.patch("semclust.clip.encoder.ClipEncoder.load", started),
          contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO())):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse: usage, then "semclust <command>: error: ..."
            assert e.code == 2, argv
            assert err.getvalue().strip().splitlines()[-1].startswith(f"semclust {command}: error: "), (argv, err.getvalue())
            event("usage error")
            return
        except Started:
            event("passed every check")
            return
    event(f"exit {rc}")
    assert rc in (1, 2), (argv, rc)
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"semclust {command}: error: "), (argv, err.getvalue())


# ---- SemanticClusterer's parameter checks ----------------------------------------------------------

ANY_PARAM = st.none() | st.booleans() | st.integers(-3, 10) | st.floats(allow_nan=True) | st.text(max_size=4)
PARAMS = st.fixed_dictionaries({}, optional={
    "n_clusters": ANY_PARAM | st.integers(2, 6),
    "stage": ANY_PARAM | st.sampled_from([1, 2]),
    "seed": ANY_PARAM | st.integers(0, 2**32),
    "progress": ANY_PARAM,
    "resume": ANY_PARAM,
    "nouns": st.none() | st.just("default"),
    "config": st.none() | st.just(Config()) | HOSTILE_CONFIGS,
    "device": st.sampled_from([None, "cpu", torch.device("cpu")]),
    "checkpoint_dir": st.none() | st.integers(0, 3) | st.text(max_size=3).map(lambda s: f"/nonexistent/{s}"),
})
INPUTS = st.tuples(st.integers(0, 6), st.integers(0, 4), st.sampled_from([np.float32, np.float64, np.int64])).map(
    lambda s: np.random.default_rng(0).normal(size=s[:2]).astype(s[2]))


@settings(max_examples=150)
@given(PARAMS, INPUTS | st.just([]) | st.integers())
def test_semantic_clusterer_checks_its_parameters(params, x):
    # checked in the constructor or at the top of fit, whichever the estimator does
    with mock.patch("semclust.pipeline.fit", started):
        try:
            SemanticClusterer(**params).fit(x)
        except (ValueError, TypeError) as e:
            one_line(e)
        except Started:
            pass
