"""Pretrained loading of KAT through the real timm + huggingface_hub code, offline, from fake released checkpoints.

Every test runs with huggingface_hub in offline mode against a fake cache under tmp_path, and with sockets blocked
(fixture ``offline_hub`` in conftest.py). The checkpoints are randomly initialised (and jittered) kat_tiny models,
saved like the release (a pickled fp32 OrderedDict ``pytorch_model.bin`` + timm ``config.json``).

What timm does, as exercised here (timm 1.0.31, huggingface_hub 2.4):

* ``pretrained=True`` on a registered name downloads ``model.safetensors`` if the repo has it, else
  ``pytorch_model.bin`` with ``torch.load(weights_only=True)``; offline, a file missing from the cache raises
  ``LocalEntryNotFoundError`` (a ``FileNotFoundError``), which timm takes as "no safetensors" and falls back on.
* ``pretrained_cfg_overlay=dict(file=PATH)`` reads the file with ``timm.models.load_state_dict(PATH)``, which
  unwraps training checkpoints (``state_dict_ema`` > ``model_ema`` > ``state_dict`` > ``model``: EMA weights win,
  ``use_ema=True`` is its default) and strips DDP ``module.`` prefixes. Hub files are not unwrapped by timm; KAT's
  ``checkpoint_filter_fn`` does it, in the same order.
* Then KAT's ``checkpoint_filter_fn`` (timm's ViT filter: position embeddings resampled for another img_size), and
  ``load_state_dict`` strict, unless num_classes differs from the checkpoint's (then the head is dropped and the
  load is NOT strict: see ``test_missing_rational_keys_with_new_head_are_an_error``).
"""
from __future__ import annotations

import argparse
import pickle
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch

import kat_timm  # noqa: F401  (registers the KAT models in timm)
import timm
from huggingface_hub.errors import LocalEntryNotFoundError

from tests.helpers import one_thread_env

pytestmark = pytest.mark.usefixtures("single_thread", "offline_hub")

TINY = "kat_tiny_patch16_224"
REPO = f"adamdad/{TINY}"
RATIONAL_KEYS = ("mlp.act1.weight_numerator", "mlp.act1.weight_denominator",
                 "mlp.act2.weight_numerator", "mlp.act2.weight_denominator")


def assert_weights_equal(model: torch.nn.Module, expected, skip=()):
    """Every tensor of ``model`` equals ``expected``'s exactly (same keys, shapes, values), except ``skip``."""
    actual = model.state_dict()
    assert set(actual) == set(expected), sorted(set(actual) ^ set(expected))[:10]
    different = [k for k in actual if k not in skip and not torch.equal(actual[k], expected[k])]
    assert not different, f"{len(different)} tensors differ from the checkpoint, e.g. {different[:5]}"


def test_fake_checkpoints_differ_from_a_fresh_model(kat_tiny_weights):
    """Sanity check of the fixtures: a load that silently did nothing could not pass the tests below."""
    fresh = timm.create_model(TINY).state_dict()
    scratch, vitft = kat_tiny_weights["scratch"], kat_tiny_weights["vitft"]
    assert set(fresh) == set(scratch) == set(vitft)
    assert sum(k.endswith(("weight_numerator", "weight_denominator")) for k in scratch) == 12 * 4
    assert scratch["blocks.0.mlp.act1.weight_numerator"].shape == (1, 6)
    assert scratch["blocks.0.mlp.act1.weight_denominator"].shape == (8, 4)
    for key in fresh:
        assert not torch.equal(fresh[key], scratch[key]), key
        assert not torch.equal(scratch[key], vitft[key]), key


# --------------------------------------------------------------------------------------------------------------------
# From the Hub cache
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, weights, hub_id",
    [
        ("kat_tiny", "scratch", REPO),
        (TINY, "scratch", REPO),
        ("kat_tiny_swish_patch16_224", "scratch", REPO),
        (f"{TINY}.vitft", "vitft", f"{REPO}.vitft"),
        ("kat_tiny.vitft", "vitft", f"{REPO}.vitft"),
        (f"hf-hub:{REPO}", "scratch", REPO),
        (f"hf-hub:{REPO}.vitft", "vitft", f"{REPO}.vitft"),
    ],
)
def test_create_model_pretrained_from_hub_cache(released_hub, kat_tiny_weights, name, weights, hub_id):
    model = timm.create_model(name, pretrained=True)
    assert type(model).__name__ == "KAT"
    assert model.pretrained_cfg["hf_hub_id"] == hub_id
    if name.startswith("hf-hub:"):
        assert model.pretrained_cfg["source"] == "hf-hub"  # the config came from config.json in the cache
        assert model.pretrained_cfg["architecture"] == TINY
    assert_weights_equal(model, kat_tiny_weights[weights])
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_env_vars_set_before_import(released_hub, kat_tiny_weights, tmp_path):
    """The user-facing recipe: HF_HUB_OFFLINE=1 and HF_HUB_CACHE in the environment of a fresh interpreter
    (huggingface_hub reads them once, at import; in-process the fixture patches huggingface_hub.constants)."""
    out = tmp_path / "loaded.pt"
    code = (
        "import sys, torch, timm, kat_timm\n"
        "from huggingface_hub import constants\n"
        "assert constants.HF_HUB_OFFLINE, 'HF_HUB_OFFLINE not picked up'\n"
        "model = timm.create_model('kat_tiny.vitft', pretrained=True)\n"
        "torch.save(model.state_dict(), sys.argv[1])\n"
    )
    env = one_thread_env()  # HF_HUB_OFFLINE / HF_HUB_CACHE come from the fixture
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_HUB_CACHE"] == str(released_hub.root)
    result = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(out, weights_only=True)
    assert set(loaded) == set(kat_tiny_weights["vitft"])
    assert all(torch.equal(loaded[k], v) for k, v in kat_tiny_weights["vitft"].items())


def test_hf_hub_config_json_is_read(released_hub, kat_tiny_weights):
    """hf-hub: builds the architecture and preprocessing config.json names, not a registered default."""
    config = released_hub.snapshot(REPO) / "config.json"
    cfg = __import__("json").loads(config.read_text())
    cfg["pretrained_cfg"]["crop_pct"] = 0.95
    cfg["architecture"] = "kat_tiny"
    config.write_text(__import__("json").dumps(cfg))
    model = timm.create_model(f"hf-hub:{REPO}", pretrained=True)
    assert model.pretrained_cfg["crop_pct"] == 0.95
    assert model.pretrained_cfg["architecture"] == "kat_tiny"
    assert timm.data.resolve_model_data_config(model)["crop_pct"] == 0.95
    assert_weights_equal(model, kat_tiny_weights["scratch"])


def test_safetensors_in_cache_is_preferred(offline_hub, kat_tiny_weights, ckpt, tmp_path):
    """model.safetensors wins over pytorch_model.bin; the .bin (here booby-trapped) is never even unpickled."""
    marker = tmp_path / "payload_ran"
    offline_hub.add_config(REPO, ckpt.released_config())
    offline_hub.add_safetensors(REPO, kat_tiny_weights["scratch"])
    ckpt.save_booby_trapped(kat_tiny_weights["vitft"], offline_hub.add_file(REPO, "pytorch_model.bin"), marker)
    model = timm.create_model(TINY, pretrained=True)
    assert_weights_equal(model, kat_tiny_weights["scratch"])
    assert not marker.exists()


def test_wrapped_training_checkpoint_in_hub_cache(offline_hub, kat_tiny_weights, ckpt):
    """A timm train.py checkpoint uploaded as pytorch_model.bin: timm does not unwrap hub files, KAT's
    checkpoint_filter_fn does (EMA first, as timm's load_state_dict), with argparse.Namespace args allowed."""
    checkpoint = {
        "epoch": 299,
        "arch": TINY,
        "state_dict": kat_tiny_weights["vitft"],
        "state_dict_ema": kat_tiny_weights["ema"],
        "args": argparse.Namespace(model=TINY, lr=1e-3),
    }
    offline_hub.add_config(REPO, ckpt.released_config())
    torch.save(checkpoint, offline_hub.add_file(REPO, "pytorch_model.bin"))
    model = timm.create_model(TINY, pretrained=True)
    assert_weights_equal(model, kat_tiny_weights["ema"])


# --------------------------------------------------------------------------------------------------------------------
# From a local file
# --------------------------------------------------------------------------------------------------------------------


def _prefixed(state_dict, prefix="module."):
    return OrderedDict((prefix + k, v) for k, v in state_dict.items())


@pytest.mark.parametrize(
    "layout, expected",
    [
        ("raw", "scratch"),
        ("state_dict", "scratch"),
        ("model", "scratch"),
        # EMA wins: timm's file loading is timm.models.load_state_dict(path, use_ema=True); KAT's filter agrees.
        ("state_dict+ema", "ema"),
        ("model+model_ema", "ema"),
        ("ddp_state_dict", "scratch"),
        ("safetensors", "scratch"),
    ],
)
def test_local_file_overlay(tmp_path, kat_tiny_weights, ckpt, layout, expected):
    weights, ema = kat_tiny_weights["scratch"], kat_tiny_weights["ema"]
    path = tmp_path / ("model.safetensors" if layout == "safetensors" else "checkpoint.pth")
    if layout == "raw":
        ckpt.save_released(weights, path)
    elif layout == "safetensors":
        import safetensors.torch

        safetensors.torch.save_file(dict(weights), str(path))
    else:
        checkpoint = {
            "raw": None,
            "state_dict": {"state_dict": weights, "epoch": 3},
            "model": {"model": weights, "epoch": 3},
            "state_dict+ema": {"state_dict": weights, "state_dict_ema": ema, "epoch": 3},
            "model+model_ema": {"model": weights, "model_ema": ema, "epoch": 3},
            "ddp_state_dict": {"state_dict": _prefixed(weights), "epoch": 3, "args": argparse.Namespace(lr=0.1)},
        }[layout]
        torch.save(checkpoint, path)
    model = timm.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert_weights_equal(model, kat_tiny_weights[expected])
    if layout not in ("raw", "safetensors"):
        # What timm's own checkpoint loader makes of the same file (its defaults: use_ema=True, strict).
        reference = timm.create_model(TINY)
        timm.models.load_checkpoint(reference, str(path))
        assert_weights_equal(model, reference.state_dict())


def test_num_classes_reinitialises_the_head(tmp_path, kat_tiny_weights, ckpt):
    path = ckpt.save_released(kat_tiny_weights["scratch"], tmp_path / "kat_tiny.pth")
    model = timm.create_model(TINY, pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(path)))
    state = model.state_dict()
    assert state["head.weight"].shape == (10, 192) and state["head.bias"].shape == (10,)
    assert torch.count_nonzero(state["head.bias"]) == 0  # timm's ViT init of a fresh head
    saved = {k: v for k, v in kat_tiny_weights["scratch"].items() if not k.startswith("head.")}
    assert_weights_equal(model, dict(saved, **{k: state[k] for k in ("head.weight", "head.bias")}))
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 224, 224)).shape == (2, 10)


def test_num_classes_from_hub(released_hub, kat_tiny_weights):
    model = timm.create_model("kat_tiny.vitft", pretrained=True, num_classes=10)
    assert model.head.weight.shape == (10, 192)
    expected = dict(kat_tiny_weights["vitft"], **{k: model.state_dict()[k] for k in ("head.weight", "head.bias")})
    assert_weights_equal(model, expected)


def test_img_size_resamples_position_embedding(released_hub, kat_tiny_weights):
    from timm.layers import resample_abs_pos_embed

    model = timm.create_model(TINY, pretrained=True, img_size=160)
    saved = kat_tiny_weights["scratch"]
    pos = model.state_dict()["pos_embed"]
    assert pos.shape == (1, 1 + 10 * 10, 192)
    expected = resample_abs_pos_embed(saved["pos_embed"], new_size=(10, 10), num_prefix_tokens=1)
    torch.testing.assert_close(pos, expected, rtol=0, atol=0)
    # The class token's embedding is carried over as is; the rest of the network is untouched.
    assert torch.equal(pos[:, 0], saved["pos_embed"][:, 0])
    assert_weights_equal(model, dict(saved, pos_embed=pos))
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 160, 160)).shape == (1, 1000)


# --------------------------------------------------------------------------------------------------------------------
# Security and errors
# --------------------------------------------------------------------------------------------------------------------


def test_booby_trap_fixture_is_live(tmp_path, kat_tiny_weights, ckpt):
    """The trapped file really runs its payload when unpickled without weights_only (so the tests below mean
    something). Only ever done here, on a file this test wrote."""
    marker = tmp_path / "control_marker"
    path = ckpt.save_booby_trapped(kat_tiny_weights["scratch"], tmp_path / "trap.pth", marker)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "payload ran"


@pytest.mark.parametrize("where", ["file", "hub"])
def test_booby_trapped_pickle_is_refused(tmp_path, offline_hub, kat_tiny_weights, ckpt, where):
    marker = tmp_path / "payload_ran"
    if where == "file":
        path = ckpt.save_booby_trapped(kat_tiny_weights["scratch"], tmp_path / "trap.pth", marker)
        kwargs = dict(pretrained_cfg_overlay=dict(file=str(path)))
    else:
        offline_hub.add_config(REPO, ckpt.released_config())
        ckpt.save_booby_trapped(kat_tiny_weights["scratch"], offline_hub.add_file(REPO, "pytorch_model.bin"), marker)
        kwargs = {}
    # timm 1.0.31 re-raises torch's pickle.UnpicklingError as a RuntimeError naming the refused globals, and never
    # retries with weights_only=False.
    with pytest.raises((RuntimeError, pickle.UnpicklingError), match=r"(?i)weights.only") as info:
        timm.create_model(TINY, pretrained=True, **kwargs)
    assert "builtins.exec" in str(info.value)  # names the refused global
    chain = [info.value, info.value.__cause__]
    assert any(isinstance(e, pickle.UnpicklingError) for e in chain)
    assert not marker.exists(), "the pickled payload ran"


def test_other_size_does_not_fit(tmp_path, ckpt):
    small = ckpt.random_kat_state_dict(7, "kat_small_patch16_224", weight_init="skip")
    path = ckpt.save_released(small, tmp_path / "kat_small.pth")
    with pytest.raises(RuntimeError, match="size mismatch") as info:
        timm.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    message = str(info.value)
    assert "blocks.0.attn.qkv.weight" in message and "torch.Size([1152, 384])" in message
    assert "torch.Size([576, 192])" in message


def test_missing_rational_keys_are_an_error(tmp_path, kat_tiny_weights, ckpt):
    weights = OrderedDict(kat_tiny_weights["scratch"])
    del weights["blocks.3.mlp.act2.weight_denominator"]
    del weights["blocks.11.mlp.act1.weight_numerator"]
    path = ckpt.save_released(weights, tmp_path / "incomplete.pth")
    with pytest.raises(RuntimeError, match="missing 2 of 48 rational") as info:
        timm.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert "blocks.3.mlp.act2.weight_denominator" in str(info.value)
    assert "blocks.11.mlp.act1.weight_numerator" in str(info.value)


@pytest.mark.parametrize("how", ["timm_overlay", "kat_timm_factory"])
def test_integer_weights_are_refused_naming_the_keys(tmp_path, kat_tiny_weights, how):
    """A safetensors file of integer tensors (a botched export) used to load as an all-zero model without a word."""
    import safetensors.torch

    from kat_timm.checkpoint import CheckpointError
    from kat_timm.factory import create_model

    weights = {k: v.contiguous() for k, v in kat_tiny_weights["scratch"].items()}
    weights["blocks.0.mlp.fc1.weight"] = weights["blocks.0.mlp.fc1.weight"].to(torch.int64)
    weights["head.weight"] = weights["head.weight"].to(torch.int8)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(weights, str(path))
    with pytest.raises(CheckpointError, match="integer or bool tensors") as info:
        if how == "timm_overlay":
            timm.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        else:
            create_model(TINY, checkpoint=path)
    assert "blocks.0.mlp.fc1.weight (torch.int64)" in str(info.value) and "head.weight (torch.int8)" in str(info.value)


def test_plain_vit_checkpoint_gets_function_preserving_rationals(tmp_path, kat_tiny_weights, ckpt):
    """A ViT state dict (mlp.fc1/fc2, no rational coefficients at all) is not an error: KAT's load_state_dict
    pre-hook completes it with act1 = identity, act2 = GELU fit (kat_timm.models.vit_state_dict_to_kat)."""
    from kat_timm.models import vit_state_dict_to_kat

    vit = OrderedDict((k, v) for k, v in kat_tiny_weights["scratch"].items() if not k.endswith(RATIONAL_KEYS))
    path = ckpt.save_released(vit, tmp_path / "vit.pth")
    model = timm.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert_weights_equal(model, vit_state_dict_to_kat(vit, num_groups=8))


def test_missing_rational_keys_with_new_head_are_an_error(tmp_path, kat_tiny_weights, ckpt):
    """timm loads non-strictly when num_classes differs from the checkpoint's: the filter must catch missing
    rational coefficients itself instead of leaving them silently at their init."""
    weights = OrderedDict(kat_tiny_weights["scratch"])
    del weights["blocks.3.mlp.act2.weight_denominator"]
    path = ckpt.save_released(weights, tmp_path / "incomplete.pth")
    with pytest.raises((RuntimeError, KeyError), match="blocks.3.mlp.act2.weight_denominator"):
        timm.create_model(TINY, pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(path)))


@pytest.mark.parametrize("name", ["kat_tiny.vitft", f"hf-hub:{REPO}"])
def test_offline_missing_cache_entry_is_a_clear_error(offline_hub, name):
    with pytest.raises(LocalEntryNotFoundError, match="cannot find the requested files in the local cache"):
        timm.create_model(name, pretrained=True)


def test_offline_cache_without_weight_file(offline_hub, ckpt):
    """refs/main and config.json present, no weights: the same error, after trying model.safetensors then
    pytorch_model.bin, and nothing is fetched."""
    offline_hub.add_config(REPO, ckpt.released_config())
    with pytest.raises(FileNotFoundError, match="local cache"):
        timm.create_model(f"hf-hub:{REPO}", pretrained=True)
    assert sorted(p.name for p in offline_hub.snapshot(REPO).iterdir()) == ["config.json"]


def test_network_is_blocked_in_these_tests(offline_hub):
    import socket

    with pytest.raises(AssertionError, match="network access"):
        socket.create_connection(("huggingface.co", 443), timeout=1)
