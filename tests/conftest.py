"""Fixtures for all tests: a seeded RNG, a backend switch, and fake released KAT checkpoints with an offline
Hugging Face cache holding them.

Only the seeding is autouse. A test opts in to the fake Hub by requesting ``offline_hub`` (or ``released_hub``), which switches
huggingface_hub to offline mode and points it at a cache under ``tmp_path`` for that one test (monkeypatch undoes
both), and blocks sockets so that any attempt to reach the network fails loudly instead of hanging.
"""

from __future__ import annotations

import json
import socket
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Optional

import pytest
import torch

from tests.helpers import fill_uninitialised_, torch_threads, trained_like

HF_ORG = "adamdad"
TINY = "kat_tiny_patch16_224"
# Seeds of the fake checkpoints: none is 0, the seed every test starts from (``_seeded``), so a freshly
# initialised model never equals a loaded one by accident.
SEEDS = {"scratch": 1001, "vitft": 1002, "ema": 1003}

# config.json of the released Hub repos (timm's format, as push_to_hf_hub wrote it).
RELEASED_PRETRAINED_CFG = {
    "tag": "",
    "custom_load": False,
    "input_size": [3, 224, 224],
    "fixed_input_size": True,
    "interpolation": "bicubic",
    "crop_pct": 0.875,
    "crop_mode": "center",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "num_classes": 1000,
    "pool_size": None,
    "first_conv": "patch_embed.proj",
    "classifier": "head",
}


def released_config(architecture: str = TINY, num_features: int = 192, tag: str = "") -> dict:
    return {
        "architecture": architecture,
        "num_classes": 1000,
        "num_features": num_features,
        "pretrained_cfg": dict(RELEASED_PRETRAINED_CFG, tag=tag),
    }


def random_kat_state_dict(seed: int, name: str = TINY, **kwargs) -> "OrderedDict[str, torch.Tensor]":
    """State dict of a randomly initialised KAT, every tensor jittered, drawn from its own RNG stream.

    The global RNG is left as it was. ``kwargs`` go to ``timm.create_model`` (``weight_init="skip"`` for a fast
    build whose values do not matter).
    """
    import timm

    import kat_timm  # noqa: F401  (registers the models)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = fill_uninitialised_(timm.create_model(name, **kwargs))
        # Jitter every tensor, like training does: the rational coefficients, LayerNorms and zero biases of a fresh
        # init are the same for every seed, and a loaded checkpoint must differ from a fresh model everywhere.
        return OrderedDict(
            (k, v.detach() + 0.01 * torch.randn_like(v)) for k, v in model.state_dict().items()
        )


def random_kat_tiny_32(seed: int) -> torch.nn.Module:
    """kat_tiny built for 32 px images with ``random_kat_state_dict(seed)`` weights, in eval mode, built on one
    thread (fast; for the inference and export tests, where the values only need to be random and finite)."""
    import timm

    with torch_threads(1):
        model = timm.create_model("kat_tiny", img_size=32, weight_init="skip")
        model.load_state_dict(random_kat_state_dict(seed, img_size=32))
        return model.eval()


def save_released(state_dict: Dict[str, torch.Tensor], path: Path) -> Path:
    """Save like the release: a pickled fp32 OrderedDict state dict, no wrapper."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(OrderedDict((k, v.float()) for k, v in state_dict.items()), path)
    return path


class BoobyTrap:
    """Unpickling this writes ``marker``: what a malicious checkpoint could do (``exec`` of arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


def save_booby_trapped(state_dict: Dict[str, torch.Tensor], path: Path, marker: Path) -> Path:
    """A torch.save'd state dict that looks normal but carries a ``BoobyTrap`` among its values."""
    path.parent.mkdir(parents=True, exist_ok=True)
    trapped = OrderedDict(state_dict)
    trapped["blocks.0.mlp.act1.weight_numerator"] = BoobyTrap(marker)
    torch.save(trapped, path)
    return path


class FakeHubCache:
    """A Hugging Face hub cache folder (``models--owner--name/{refs,snapshots}``) that tests fill with repos."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._next_revision = 0

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / ("models--" + repo_id.replace("/", "--"))

    def snapshot(self, repo_id: str) -> Path:
        """The snapshot folder ``refs/main`` points to (created, with a fresh revision, on first use)."""
        repo = self.repo_dir(repo_id)
        ref = repo / "refs" / "main"
        if not ref.exists():
            self._next_revision += 1
            revision = f"{self._next_revision:040x}"
            ref.parent.mkdir(parents=True, exist_ok=True)
            ref.write_text(revision)  # no trailing newline: huggingface_hub reads the file verbatim
            (repo / "snapshots" / revision).mkdir(parents=True)
        return repo / "snapshots" / ref.read_text()

    def add_file(self, repo_id: str, filename: str, content: Optional[bytes] = None) -> Path:
        path = self.snapshot(repo_id) / filename
        if content is not None:
            path.write_bytes(content)
        return path

    def add_config(self, repo_id: str, config: dict) -> Path:
        return self.add_file(repo_id, "config.json", json.dumps(config, indent=2).encode())

    def add_released(self, repo_id: str, state_dict: Dict[str, torch.Tensor], config: Optional[dict] = None) -> Path:
        """A repo as released: config.json + pytorch_model.bin (no model.safetensors)."""
        self.add_config(repo_id, config or released_config())
        return save_released(state_dict, self.add_file(repo_id, "pytorch_model.bin"))

    def add_safetensors(self, repo_id: str, state_dict: Dict[str, torch.Tensor]) -> Path:
        import safetensors.torch

        path = self.add_file(repo_id, "model.safetensors")
        safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
        return path


def _no_network(*args, **kwargs):
    raise AssertionError(f"network access attempted in an offline test: {args!r}")


@pytest.fixture
def single_thread():
    """Run the test on one intra-op thread (the previous count restored afterwards): the one way tests set threads.

    Building a KAT runs a few hundred small linear-algebra calls; on a busy 2-core machine OpenMP's barriers make
    them several times slower with 2 threads than with 1. Fixtures of module or session scope use the same
    ``tests.helpers.torch_threads`` this runs on, and child processes get ``tests.helpers.one_thread_env()``.
    """
    with torch_threads(1):
        yield


@pytest.fixture
def small_kat() -> torch.nn.Module:
    """A 3-block kat_tiny at 32 px whose rationals are jittered (``trained_like``), for the plot tests."""
    import timm

    import kat_timm  # noqa: F401  (registers the models)

    return trained_like(timm.create_model("kat_tiny", depth=3, img_size=32))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> FakeHubCache:
    """An empty fake HF cache; huggingface_hub offline and pointed at it; sockets blocked. Undone after the test.

    huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE from the environment once, at import, into
    ``huggingface_hub.constants``; its download code reads those module attributes at call time (``cache_dir``
    defaults to ``constants.HF_HUB_CACHE``, offline mode is ``constants.is_offline_mode()``), so patching the
    constants is what takes effect in-process. The environment variables are set too, for subprocesses.
    """
    from huggingface_hub import constants

    cache = FakeHubCache(tmp_path / "hf_cache" / "hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache.root))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache.root))
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)
    monkeypatch.setattr(socket, "getaddrinfo", _no_network)
    assert constants.is_offline_mode()
    return cache


@pytest.fixture(scope="session")
def kat_tiny_weights() -> Dict[str, "OrderedDict[str, torch.Tensor]"]:
    """Fake released kat_tiny weights: ``scratch`` (default tag), ``vitft`` and ``ema``, each its own random init.

    Session-scoped (built once): tests must not modify the tensors (loading copies them).
    """
    with torch_threads(1):
        return {kind: random_kat_state_dict(seed) for kind, seed in SEEDS.items()}


@pytest.fixture
def released_hub(offline_hub, kat_tiny_weights) -> FakeHubCache:
    """The offline cache with both released kat_tiny repos: the default tag and ``.vitft`` (different weights)."""
    offline_hub.add_released(f"{HF_ORG}/{TINY}", kat_tiny_weights["scratch"])
    offline_hub.add_released(f"{HF_ORG}/{TINY}.vitft", kat_tiny_weights["vitft"], released_config(tag="vitft"))
    return offline_hub


@pytest.fixture
def ckpt():
    """The checkpoint-writing helpers of this conftest, for tests (a fixture, so no import of conftest is needed)."""
    return SimpleNamespace(
        random_kat_state_dict=random_kat_state_dict,
        released_config=released_config,
        save_released=save_released,
        save_booby_trapped=save_booby_trapped,
        BoobyTrap=BoobyTrap,
        HF_ORG=HF_ORG,
        TINY=TINY,
    )


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def use_backend(monkeypatch):
    """Force a backend through KAT_RATIONAL_BACKEND for the duration of one test."""

    def _use(name: str) -> None:
        monkeypatch.setenv("KAT_RATIONAL_BACKEND", name)

    return _use
