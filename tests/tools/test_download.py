"""``kat_timm.tools.download``: offline, against a fake Hugging Face cache in tmp_path.

The network path can't run here. It is simulated by replacing ``hf_hub_download`` and ``_hub_answers`` (the HEAD
request before it: the two functions that reach the network) with fakes that write into the fake cache, as the real
ones do; everything else (cache lookups, timm's pretrained loading) is the real code. An unreachable Hub is a real
refused port on 127.0.0.1. Every test ends by checking what matters: that timm then loads the weights with
HF_HUB_OFFLINE=1, or that the failure names the model and the reason. ``tests/cli/test_download.py`` uses the fakes
defined here.
"""
from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from huggingface_hub import constants
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

import kat_timm.tools.download as download_module
from kat_timm.tools.download import DownloadError, download_pretrained, format_size, resolve_hub_repo

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_REPO = "adamdad/kat_tiny_patch16_224"
RELEASED_REPOS = {f"adamdad/kat_{size}_patch16_224{tag}" for size in ("tiny", "small", "base") for tag in ("", ".vitft")}


def _no_fetch(*args, **kwargs):
    raise AssertionError(f"hf_hub_download called although nothing should be fetched: {args} {kwargs}")


class FakeHub:
    """Stands in for ``hf_hub_download``: serves ``repos`` {repo_id: {filename: bytes}} by writing the file into the
    fake cache (where the real function puts it) and returning its path; files not in a repo raise
    ``EntryNotFoundError``, as the real function does on a 404. Records every call."""

    def __init__(self, cache, repos):
        self.cache = cache
        self.repos = repos
        self.calls = []

    def __call__(self, repo_id, filename, revision=None, cache_dir=None, **kwargs):
        self.calls.append((repo_id, filename))
        assert cache_dir is None, "the default cache was asked for"
        if filename not in self.repos.get(repo_id, {}):
            raise EntryNotFoundError(f"404: {filename} not found in {repo_id}")
        return str(self.cache.add_file(repo_id, filename, self.repos[repo_id][filename]))


def _released_files(ckpt, state_dict, tmp_path) -> dict:
    """config.json and pytorch_model.bin as in the released repo, as bytes."""
    import json

    weights = ckpt.save_released(state_dict, tmp_path / "served" / "pytorch_model.bin")
    return {"config.json": json.dumps(ckpt.released_config()).encode(), "pytorch_model.bin": weights.read_bytes()}


def _assert_loads_offline(expected):
    assert constants.is_offline_mode()
    model = timm.create_model("kat_tiny_patch16_224", pretrained=True)
    loaded = model.state_dict()
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected), "timm loaded other weights than the cached"


def _fail_with(error):
    def fake(*args, **kwargs):
        raise error

    return fake


_REAL_SOCKET = (socket.socket.connect, socket.create_connection, socket.getaddrinfo)


def _allow_loopback_only(monkeypatch):
    """Undo the offline fixture's socket block for 127.0.0.1 alone: a refused local port is a real unreachable Hub."""
    connect, create_connection, getaddrinfo = _REAL_SOCKET

    def loopback(host):
        assert host in ("127.0.0.1", "localhost"), f"network access attempted in an offline test: {host}"

    monkeypatch.setattr(socket.socket, "connect", lambda sock, address: loopback(address[0]) or connect(sock, address))
    monkeypatch.setattr(socket, "create_connection",
                        lambda address, *a, **k: loopback(address[0]) or create_connection(address, *a, **k))
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: loopback(host) or getaddrinfo(host, *a, **k))


def _as_blob(cache, repo_id: str, filename: str) -> Path:
    """Move a cached file to huggingface_hub's real layout: ``blobs/<sha256>`` with a snapshot symlink to it."""
    import hashlib
    import os

    link = cache.snapshot(repo_id) / filename
    content = link.read_bytes()
    blob = cache.repo_dir(repo_id) / "blobs" / hashlib.sha256(content).hexdigest()
    blob.parent.mkdir(exist_ok=True)
    blob.write_bytes(content)
    link.unlink()
    os.symlink(os.path.relpath(blob, link.parent), link)
    return blob


def test_safetensors_is_preferred_when_the_repo_has_it(offline_hub, monkeypatch):
    hub = FakeHub(offline_hub, {TINY_REPO: {"config.json": b"{}", "model.safetensors": b"st", "pytorch_model.bin": b"pt"}})
    monkeypatch.setattr(download_module, "hf_hub_download", hub)
    result = download_pretrained("kat_tiny")
    assert [f.filename for f in result.files] == ["config.json", "model.safetensors"]
    assert (TINY_REPO, "pytorch_model.bin") not in hub.calls


def test_offline_with_weights_missing_names_the_weight_files(offline_hub, ckpt):
    offline_hub.add_config(TINY_REPO, ckpt.released_config())
    with pytest.raises(DownloadError, match=r"kat_tiny \(adamdad/kat_tiny_patch16_224\): model.safetensors or "
                                            r"pytorch_model.bin is not in the cache .* HF_HUB_OFFLINE=1"):
        download_pretrained("kat_tiny")


@pytest.mark.parametrize("error,reason", [
    (LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub"),
     "could not reach the Hugging Face Hub to fetch config.json (no network?)"),
    (RepositoryNotFoundError("404 Client Error", response=SimpleNamespace(headers={}, request=None)),
     "no repository adamdad/kat_tiny_patch16_224 on the Hugging Face Hub"),
    (TimeoutError("timed out"), "network error while fetching config.json: TimeoutError: timed out"),
    # The HTTP client's own exceptions (httpx in huggingface_hub 1.x, its fork httpx2 in 2.x).
    (type("ReadTimeout", (Exception,), {"__module__": "httpx._exceptions"})("read timed out"),
     "network error while fetching config.json: ReadTimeout: read timed out"),
    (PermissionError("[Errno 13] Permission denied: '/cache'"), "could not write to the cache"),
])
def test_online_failures_name_the_model_and_the_reason(offline_hub, monkeypatch, error, reason):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # "online" (sockets stay blocked: the fake fails first)
    monkeypatch.setattr(download_module, "_hub_answers", _fail_with(error))  # the HEAD request before the download
    monkeypatch.setattr(download_module, "hf_hub_download", _no_fetch)
    with pytest.raises(DownloadError) as raised:
        download_pretrained("kat_tiny")
    assert str(raised.value).startswith("kat_tiny (adamdad/kat_tiny_patch16_224): ")
    assert reason in str(raised.value)


def test_a_repo_without_weights_is_reported(offline_hub, monkeypatch):
    monkeypatch.setattr(download_module, "hf_hub_download", FakeHub(offline_hub, {TINY_REPO: {"config.json": b"{}"}}))
    with pytest.raises(DownloadError, match="the repo holds none of model.safetensors, pytorch_model.bin"):
        download_pretrained("kat_tiny")


def test_resolve_follows_the_registered_pretrained_cfgs():
    assert resolve_hub_repo("kat_base.vitft") == ("adamdad/kat_base_patch16_224.vitft", None, "pytorch_model.bin")
    assert resolve_hub_repo("kat_small_swish_patch16_224")[0] == "adamdad/kat_small_patch16_224"
    assert resolve_hub_repo("hf-hub:someone/kat@abc123") == ("someone/kat", "abc123", "pytorch_model.bin")


@pytest.mark.parametrize("size,text", [(0, "0 B"), (999, "999 B"), (1500, "1.5 kB"), (22_912_345, "22.9 MB"),
                                       (346_000_000, "346.0 MB"), (3_200_000_000, "3.2 GB")])
def test_format_size(size, text):
    assert format_size(size) == text
