"""Weights fetched like torchvision: downloaded once from a (loopback) server into the torch hub
cache, the SHA-256 prefix in the file name checked, nothing cached when it is wrong, and the
offline switch / an unreachable server giving the file to copy and where."""

from __future__ import annotations

import hashlib
import io
import socket
import sys
from pathlib import Path

import pytest
import torch

from raysr.hub import WeightsHashError, WeightsUnavailable, fetch
from raysr.models.vgg import load_vgg19_weights

sys.path.insert(0, str(Path(__file__).parent))
from test_vgg import random_vgg19_state  # noqa: E402


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Downloads allowed (the session is offline by default) into an empty hub cache."""
    monkeypatch.delenv("RAYSR_OFFLINE")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def serve(server, stem: str, data: bytes, right_hash: bool = True) -> str:
    """Put ``data`` on the server as ``<stem>-<8 hex>.pth`` (its real hash prefix, or a wrong one); its URL."""
    prefix = hashlib.sha256(data).hexdigest()[:8] if right_hash else "00000000"
    name = f"{stem}-{prefix}.pth"
    (server.root / name).write_bytes(data)
    return f"{server.url}/{name}"


def state_bytes(state) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def test_a_good_file_is_downloaded_once_into_the_hub_cache(file_server, online):
    data = state_bytes({"w": torch.arange(6.0)})
    url = serve(file_server, "tiny", data)
    path = fetch(url)
    assert Path(path).parent == online and Path(path).read_bytes() == data
    assert fetch(url) == path
    assert len(file_server.requests) == 1  # the second call read the cache
    assert sorted(p.name for p in online.iterdir()) == [Path(url).name]  # no temporary file left


def test_a_wrong_hash_is_an_error_and_caches_nothing(file_server, online):
    url = serve(file_server, "tiny", state_bytes({"w": torch.ones(3)}), right_hash=False)
    with pytest.raises(WeightsHashError, match=r"SHA-256 [0-9a-f]{64} does not start with 00000000.*nothing was cached"):
        fetch(url, "test weights")
    assert not online.exists() or list(online.iterdir()) == []


def test_unreachable_and_offline_name_the_file_to_copy(file_server, online, monkeypatch):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(WeightsUnavailable, match=rf"cannot download .* from http://127.0.0.1:{closed}/vgg19-dcbb9e9d.pth "
                                                 rf".*copy vgg19-dcbb9e9d.pth .* into {online}/"):
        fetch(f"http://127.0.0.1:{closed}/vgg19-dcbb9e9d.pth")
    monkeypatch.setenv("RAYSR_OFFLINE", "1")
    url = serve(file_server, "tiny", b"x" * 10)
    with pytest.raises(WeightsUnavailable, match=rf"RAYSR_OFFLINE is set; copy {Path(url).name} .* into {online}/"):
        fetch(url)
    assert file_server.requests == []


def test_vgg19_weights_from_a_url(file_server, online):
    state = random_vgg19_state(seed=3)
    url = serve(file_server, "vgg19", state_bytes(state))
    loaded = load_vgg19_weights(url)
    assert torch.equal(loaded["features.34.weight"], state["features.34.weight"])
    assert (online / Path(url).name).is_file()


def test_default_vgg19_offline_says_what_to_copy(online, monkeypatch):
    monkeypatch.setenv("RAYSR_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=rf"VGG19 ImageNet weights not found: .*copy vgg19-dcbb9e9d.pth "
                                                rf"\(from https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"):
        load_vgg19_weights()


def test_train_dry_run_fetches_gan_weights_before_ray(file_server, online, capsys):
    from raysr.train import main

    good = serve(file_server, "vgg19", state_bytes(random_vgg19_state(seed=4)))
    assert main(["--preset", "esrgan_x4", "--set", f"loss.perceptual.weights_path={good}", "--dry-run"]) == 0
    assert (online / Path(good).name).is_file()
    bad = serve(file_server, "vgg19bad", state_bytes(random_vgg19_state(seed=5)), right_hash=False)
    capsys.readouterr()
    assert main(["--preset", "esrgan_x4", "--set", f"loss.perceptual.weights_path={bad}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "loss.perceptual.weights_path:" in err and "does not start with 00000000" in err
    assert not (online / Path(bad).name).exists()


def test_lpips_backbone_from_a_url(file_server, online, monkeypatch, tmp_path):
    """With the lpips package importable (a stand-in, as in test_evaluate), the backbone is fetched."""
    from test_evaluate import install_fake_lpips

    from raysr.lpips import load_lpips

    install_fake_lpips(tmp_path, monkeypatch)
    backbone = {"features.0.weight": torch.rand(4, 3, 3, 3), "features.0.bias": torch.rand(4)}
    url = serve(file_server, "alexnet-owt", state_bytes(backbone))
    fn, description = load_lpips("alex", backbone=url)
    assert fn is not None and str(online) in description
    monkeypatch.setenv("RAYSR_OFFLINE", "1")
    fn, reason = load_lpips("alex")  # the default torchvision URL, offline: the file to copy
    assert fn is None and "alexnet-owt-7be5be79.pth" in reason


@pytest.fixture
def raw_server():
    """A loopback server that answers every request with ``reply`` (bytes; None: accept and say nothing)."""
    import threading
    from types import SimpleNamespace

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    state = SimpleNamespace(reply=None, url=f"http://127.0.0.1:{server.getsockname()[1]}", conns=[])

    def serve_forever():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            state.conns.append(conn)
            conn.recv(65536)
            if state.reply is not None:
                conn.sendall(state.reply)
                conn.close()

    threading.Thread(target=serve_forever, daemon=True).start()
    yield state
    server.close()
    for conn in state.conns:
        conn.close()


def test_a_download_cut_short_caches_nothing_even_without_a_hash_in_the_name(raw_server, online):
    """The server announces 1000 bytes and closes after 100: HEAD and GET both get that reply."""
    raw_server.reply = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n" + b"x" * 100
    with pytest.raises(WeightsUnavailable, match=r"cannot download weights from .*cut short: 100 of 1000 bytes"):
        fetch(f"{raw_server.url}/plain.pth")
    assert not online.exists() or list(online.iterdir()) == []


def test_a_stalled_server_ends_the_download_after_the_timeout(raw_server, online, monkeypatch):
    import raysr.hub

    monkeypatch.setattr(raysr.hub, "TIMEOUT_S", 0.5)  # the server accepts and never answers
    with pytest.raises(WeightsUnavailable, match=r"cannot download weights from .*timed out"):
        fetch(f"{raw_server.url}/stalled-0123abcd.pth")
    assert socket.getdefaulttimeout() is None  # the process's default is put back
