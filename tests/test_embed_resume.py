"""`semclust embed` killed with SIGKILL mid-run, then run again, ends with exactly the
store of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from clip_fixtures import TINY_CLIP_CONFIG, save_checkpoint, tiny_encoder, write_random_pngs

from semclust.inputs.store import open_store


def _rows_done(store):
    try:
        return json.loads((store / "manifest.json").read_text())["count"]
    except (OSError, ValueError, KeyError):
        return 0


def _embed_cmd(images, out, ckpt):
    return [sys.executable, "-m", "semclust", "embed", str(images), "--out", str(out), "--clip", str(TINY_CLIP_CONFIG),
            "--pretrained", str(ckpt), "--batch-size", "2", "--shard-rows", "8", "--no-progress"]


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    images = tmp_path / "images"
    write_random_pngs(images, n=160, size=(32, 32))
    ckpt = save_checkpoint(tiny_encoder(), tmp_path / "tiny.safetensors")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    subprocess.run(_embed_cmd(images, whole, ckpt), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_embed_cmd(images, killed, ckpt), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not _rows_done(killed) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed: give it more images"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = open_store(killed, allow_incomplete=True)
    assert 0 < len(partial) < 160 and not partial.complete

    subprocess.run(_embed_cmd(images, killed, ckpt), check=True, env=env, capture_output=True)
    a, b = open_store(whole), open_store(killed)
    assert b.complete and b.items == a.items
    assert np.array_equal(a.to_tensor().numpy(), b.to_tensor().numpy())
