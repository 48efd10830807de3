"""Offline, an open_clip pretrained tag fails within seconds with how to pass a local
checkpoint, instead of huggingface_hub's minute of retries (no real network is used)."""

import socket
import time

import open_clip
import pytest

from clip_fixtures import write_random_pngs
from semclust.cli import main
from semclust.clip import encoder as enc
from semclust.clip.encoder import ClipEncoder, WeightsUnavailableError, check_weights_reachable

PROXY_ENV = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture
def not_cached(monkeypatch):
    """No cached weights, no offline flag, no proxy; open_clip must never be asked to download."""
    for name in (*enc.OFFLINE_ENV, *PROXY_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(enc, "_weights_cached", lambda arch, tag: False)

    def download(*args, **kwargs):
        raise AssertionError("open_clip.create_model was called: the offline check did not stop it")

    monkeypatch.setattr(open_clip, "create_model", download)


def _connect_fails(monkeypatch, exc: BaseException) -> list[tuple]:
    calls: list[tuple] = []

    def connect(address, timeout=None, *args, **kwargs):
        calls.append((address, timeout))
        raise exc

    monkeypatch.setattr(socket, "create_connection", connect)
    return calls


@pytest.mark.parametrize("flag", enc.OFFLINE_ENV)
def test_offline_flag_fails_at_once_without_connecting(not_cached, monkeypatch, flag):
    monkeypatch.setenv(flag, "1")
    calls = _connect_fails(monkeypatch, AssertionError("connected although offline was set"))
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match=f"{flag}=1 is set") as e:
        ClipEncoder.load("ViT-B-32", pretrained="openai")
    assert time.perf_counter() - t0 < 5 and not calls
    message = str(e.value)
    assert "--pretrained /path/to/open_clip_pytorch_model.bin" in message and "\n" not in message
    # the OpenAI weights need QuickGELU, which only the -quickgelu config builds from a file
    assert "--clip ViT-B-32-quickgelu" in message


def test_unreachable_hub_fails_fast(not_cached, monkeypatch):
    calls = _connect_fails(monkeypatch, ConnectionRefusedError(111, "Connection refused"))
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="huggingface.co:443 cannot be reached.*--pretrained"):
        ClipEncoder.load("ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert time.perf_counter() - t0 < 5
    assert calls == [(("huggingface.co", 443), enc.HUB_PROBE_TIMEOUT_S)]


def test_hanging_lookup_is_cut_off_within_5s(not_cached, monkeypatch):
    # a DNS lookup that hangs is not bounded by the socket timeout: the probe thread is
    def hang(*a, **k):  # then fail as a lookup that finally gives up does (the daemon thread outlives the test)
        time.sleep(30)
        raise OSError("lookup timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="no answer within 2 s"):
        ClipEncoder.load("ViT-B-32", pretrained="openai")
    assert time.perf_counter() - t0 < 5


def test_proxy_is_probed_instead_of_the_hub(not_cached, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.local:3128")
    calls = _connect_fails(monkeypatch, OSError("unreachable"))
    with pytest.raises(WeightsUnavailableError, match="proxy.local:3128"):
        check_weights_reachable("ViT-B-32", "openai")
    assert calls[0][0] == ("proxy.local", 3128)


def test_reachable_hub_lets_open_clip_download(not_cached, monkeypatch):
    class Connection:
        def close(self) -> None:
            pass

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: Connection())
    check_weights_reachable("ViT-B-32", "openai")  # no error: open_clip downloads as before


def test_cached_weights_need_no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(enc, "_weights_cached", lambda arch, tag: True)
    _connect_fails(monkeypatch, AssertionError("probed although the weights are cached"))
    check_weights_reachable("ViT-B-32", "openai")


def test_cache_lookup_uses_the_hub_file_names(monkeypatch):
    asked = []

    def lookup(repo, name, *args, **kwargs):
        asked.append((repo, name))
        return "/cache/file" if name == "open_clip_pytorch_model.bin" else None

    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lookup)
    assert enc._weights_cached("ViT-B-32", "openai")
    assert asked == [("timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors"),
                     ("timm/vit_base_patch32_clip_224.openai", "open_clip_pytorch_model.bin")]


def test_cli_embed_offline_is_one_line(not_cached, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_random_pngs(tmp_path / "images", n=2)
    t0 = time.perf_counter()
    rc = main(["embed", str(tmp_path / "images"), "--out", str(tmp_path / "store"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and time.perf_counter() - t0 < 5
    assert err.startswith("semclust embed: error: cannot fetch the open_clip weights ViT-B-32/openai")
    assert "--pretrained /path/to/" in err and err.count("\n") == 1
    assert not (tmp_path / "store").exists()
