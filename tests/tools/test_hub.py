"""scripts/convert_checkpoint.py and kat_timm.tools.hub: a released-format KAT checkpoint -> Hub-ready folder -> timm.

The checkpoints are random kat_tiny models (every tensor jittered, so nothing equals a fresh init), saved like the
release: a pickled fp32 OrderedDict in a .bin. The converted folder must load with
``timm.create_model("local-dir:OUTDIR", pretrained=True)`` to the same weights and the same outputs. Offline: the
Hub is never contacted (huggingface_hub offline, sockets blocked).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import socket
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import kat_timm  # noqa: F401  (registers the KAT models in timm)
import timm
from kat_timm.tools import hub
from tests.helpers import fill_uninitialised_, one_thread_env, torch_threads

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "convert_checkpoint.py"
TINY = "kat_tiny_patch16_224"
RATIONAL = ("weight_numerator", "weight_denominator")


def _load_script():
    spec = importlib.util.spec_from_file_location("convert_checkpoint_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_script = _load_script()


def _no_network(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args!r}")


@pytest.fixture(autouse=True)
def _offline_single_thread(monkeypatch, tmp_path, single_thread):
    """Offline huggingface_hub, no sockets, one intra-op thread (model builds are much faster on a busy 2-core
    machine); all undone after each test."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)


def _random_state_dict(seed: int, name: str = TINY, **kwargs):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # weight_init="skip" leaves torch.empty tensors (they can hold NaN, which the conversion rightly refuses)
        model = fill_uninitialised_(timm.create_model(name, **kwargs))
        return OrderedDict((k, v.detach() + 0.01 * torch.randn_like(v)) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def weights():
    with torch_threads(1):
        return {"model": _random_state_dict(2001), "ema": _random_state_dict(2002)}


def _save_released(state_dict, path: Path) -> Path:
    torch.save(OrderedDict((k, v.float()) for k, v in state_dict.items()), path)
    return path


def _assert_same_weights(model, expected):
    actual = model.state_dict()
    assert set(actual) == set(expected)
    different = [k for k in actual if not torch.equal(actual[k], expected[k])]
    assert not different, different[:5]


def _convert(argv, capsys=None):
    code = convert_script.main([str(a) for a in argv])
    out = capsys.readouterr() if capsys is not None else None
    return code, out


# --------------------------------------------------------------------------------------------------------------------
# The command line, end to end
# --------------------------------------------------------------------------------------------------------------------


def test_cli_converts_a_released_bin_and_timm_loads_it(tmp_path, weights):
    source = _save_released(weights["model"], tmp_path / "pytorch_model.bin")
    out = tmp_path / "kat_tiny_hub"
    env = one_thread_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hf_cache"))
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(source), "--model", TINY, "-o", str(out)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert f"-> {TINY}, 5,718,328 params, 1000 classes" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                      "pytorch_model.bin"]

    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == TINY and config["num_classes"] == 1000 and config["num_features"] == 192
    cfg = config["pretrained_cfg"]
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875 and cfg["crop_mode"] == "center"
    assert cfg["input_size"] == [3, 224, 224]
    assert cfg["first_conv"] == "patch_embed.proj" and cfg["classifier"] == "head"
    assert cfg["mean"] == [0.485, 0.456, 0.406] and cfg["std"] == [0.229, 0.224, 0.225]

    card = (out / "README.md").read_text()
    assert "license: mit" in card and "library_name: timm" in card
    assert "import kat_timm" in card and 'timm.create_model("hf-hub:adamdad/kat_tiny_patch16_224"' in card
    assert "| **`kat_tiny_patch16_224`** | **from scratch** | **5.7M** | **74.6** |" in card
    assert "| `kat_base_patch16_224.vitft` | ViT init | 86.6M | 82.8 |" in card

    # Round trip through timm, both weight files: identical tensors and identical outputs.
    reference = timm.create_model(TINY)
    reference.load_state_dict(weights["model"])
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference.eval()(x)
    for keep in ("model.safetensors", "pytorch_model.bin"):
        model = timm.create_model(f"local-dir:{out}", pretrained=True)
        _assert_same_weights(model, weights["model"])
        with torch.no_grad():
            assert torch.equal(model.eval()(x), expected)
        (out / keep).unlink()  # then the other file is what timm reads


# --------------------------------------------------------------------------------------------------------------------
# Input layouts
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, flags, expected",
    [
        ("state_dict", [], "model"),
        ("model", [], "model"),
        ("ddp", [], "model"),
        ("compiled_ddp", [], "model"),
        ("ema", [], "ema"),  # EMA weights when present, as timm's loaders
        ("ema", ["--ema"], "ema"),
        ("ema", ["--no-ema"], "model"),
        ("safetensors", [], "model"),
    ],
)
def test_training_checkpoint_layouts(tmp_path, capsys, weights, layout, flags, expected):
    sd, ema = weights["model"], weights["ema"]
    prefixed = OrderedDict(("module." + k, v) for k, v in sd.items())
    path = tmp_path / ("weights.safetensors" if layout == "safetensors" else "checkpoint.pth.tar")
    if layout == "safetensors":
        import safetensors.torch

        safetensors.torch.save_file(dict(sd), str(path))
    else:
        checkpoint = {
            "state_dict": {"state_dict": sd, "epoch": 3, "args": argparse.Namespace(model=TINY, lr=1e-3)},
            "model": {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3},
            "ddp": {"state_dict": prefixed, "epoch": 3},
            "compiled_ddp": OrderedDict(("_orig_mod.module." + k, v) for k, v in sd.items()),
            "ema": {"state_dict": prefixed, "state_dict_ema": ema, "epoch": 3},
        }[layout]
        torch.save(checkpoint, path)
    out = tmp_path / "out"
    code, captured = _convert([path, "-o", out, "--safe-serialization", "true", *flags], capsys)  # arch inferred
    assert code == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert type(model).__name__ == "KAT" and model.pretrained_cfg["architecture"] == TINY
    _assert_same_weights(model, weights[expected])


def test_vitft_tag_and_other_head(tmp_path, capsys, weights):
    """--tag vitft: the config's tag; a 10-class head gives a 10-class model, whose card claims no ImageNet result
    (a released file's head has 1000 classes: these are not the released weights)."""
    sd = OrderedDict(weights["model"])
    sd["head.weight"], sd["head.bias"] = torch.randn(10, 192), torch.randn(10)
    path = _save_released(sd, tmp_path / "finetuned.bin")
    code, captured = _convert([path, "--model", "kat_tiny", "--tag", "vitft", "-o", tmp_path / "out"], capsys)
    assert code == 0, captured.err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == "kat_tiny" and config["num_classes"] == 10
    assert config["pretrained_cfg"]["tag"] == "vitft"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "imagenet" not in card.lower() and "75.7" not in card and "74.6" not in card
    assert "Classes:** 10 (no class names recorded)" in card
    assert "Params:** 5.53M (5,527,258)" in card  # this checkpoint's own count (10-class head)
    model = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert model.num_classes == 10
    _assert_same_weights(model, sd)


def test_a_gelu_model_and_a_bare_training_record_get_no_imagenet_claim(tmp_path, capsys, weights):
    """*_gelu_* shares every shape with the released swish models but has no released weights (issue 22.2)."""
    path = _save_released(weights["model"], tmp_path / "pytorch_model.bin")
    code, captured = _convert([path, "--model", "kat_tiny_gelu_patch16_224", "-o", tmp_path / "gelu"], capsys)
    assert code == 0, captured.err
    card = (tmp_path / "gelu" / "README.md").read_text()
    assert "imagenet" not in card.lower() and "74.6" not in card and "adamdad/" not in card
    assert "does not record where its training started" in card
    assert f'timm.create_model("local-dir:{(tmp_path / "gelu").resolve()}", pretrained=True)' in card


# --------------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------------


def _error(argv, capsys) -> str:
    code, captured = _convert(argv, capsys)
    assert code == 2, captured
    assert captured.err.startswith("convert_checkpoint.py: error: ")
    return captured.err


def test_error_missing_file(tmp_path, capsys):
    assert "checkpoint not found" in _error([tmp_path / "nope.bin", "-o", tmp_path / "out"], capsys)
    assert not (tmp_path / "out").exists()


def test_error_not_a_kat_checkpoint(tmp_path, capsys, weights):
    vit = OrderedDict((k, v) for k, v in weights["model"].items() if not k.endswith(RATIONAL))
    path = _save_released(vit, tmp_path / "vit.bin")
    err = _error([path, "-o", tmp_path / "out"], capsys)
    assert "not a KAT checkpoint" in err and "plain ViT" in err and "kat_from_vit" in err
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "no_weights.pth")
    assert "no model weights found" in _error([tmp_path / "no_weights.pth", "-o", tmp_path / "out"], capsys)


def test_error_unknown_and_ambiguous_architecture(tmp_path, capsys, weights):
    odd = {
        "patch_embed.proj.weight": torch.zeros(256, 3, 16, 16),
        "blocks.0.mlp.act1.weight_numerator": torch.zeros(1, 6),
    }
    torch.save(odd, tmp_path / "odd.pth")
    err = _error([tmp_path / "odd.pth", "-o", tmp_path / "out"], capsys)
    assert "unknown architecture: embed dim 256" in err and "pass the model name" in err
    shallow = OrderedDict((k, v) for k, v in weights["model"].items()
                          if not (k.startswith("blocks.") and int(k.split(".")[1]) >= 6))
    path = _save_released(shallow, tmp_path / "shallow.bin")
    err = _error([path, "-o", tmp_path / "out"], capsys)
    assert "ambiguous architecture" in err and "depth 6 != 12" in err
    # An explicit --model that does not fit: the load error names the missing keys, in one line.
    err = _error([path, "--model", TINY, "-o", tmp_path / "out"], capsys)
    assert "does not fit kat_tiny_patch16_224" in err and "blocks.6.mlp.act1.weight_numerator" in err
    assert err.count("\n") == 1 and len(err) < 600, err
    assert "unknown model 'vit_tiny_patch16_224'" in _error(
        [path, "--model", "vit_tiny_patch16_224", "-o", tmp_path / "out"], capsys)
    err = _error([tmp_path / "odd.pth", "--model", TINY, "--tag", "in22k", "-o", tmp_path / "out"], capsys)
    assert "Invalid pretrained tag (in22k)" in err


def test_error_non_finite_weights_write_nothing(tmp_path, capsys, weights):
    diverged = OrderedDict(weights["model"])
    diverged["blocks.3.mlp.fc1.weight"] = diverged["blocks.3.mlp.fc1.weight"].clone()
    diverged["blocks.3.mlp.fc1.weight"][0, 0] = float("nan")
    path = _save_released(diverged, tmp_path / "diverged.bin")
    err = _error([path, "-o", tmp_path / "out"], capsys)
    assert "holds non-finite values (NaN or infinity) in blocks.3.mlp.fc1.weight" in err, err
    assert "verification failed" not in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_error_size_mismatch(tmp_path, capsys):
    small = _random_state_dict(3, "kat_small_patch16_224", weight_init="skip")
    path = _save_released(small, tmp_path / "small.bin")
    err = _error([path, "--model", TINY, "-o", tmp_path / "out"], capsys)
    # One line naming what the file holds (issue 22.7: it was 152 lines of torch's key list), as every command says it.
    assert f"{path} does not fit {TINY}: it holds a kat_small_patch16_224; give the matching model name" in err
    assert err.count("\n") == 1, err


def test_error_output_dir_not_empty_then_force(tmp_path, capsys, weights):
    path = _save_released(weights["model"], tmp_path / "pytorch_model.bin")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "pytorch_model.bin").write_bytes(b"stale")
    assert "output directory is not empty" in _error([path, "-o", out], capsys)
    assert (out / "pytorch_model.bin").read_bytes() == b"stale"
    code, captured = _convert([path, "-o", out, "--force", "--safe-serialization", "true"], capsys)
    assert code == 0, captured.err
    # The stale weights are gone (timm would otherwise find two), unrelated files are left alone.
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "notes.txt"]


def test_error_ema_requested_but_absent(tmp_path, capsys, weights):
    path = _save_released(weights["model"], tmp_path / "pytorch_model.bin")
    assert "EMA weights requested" in _error([path, "--ema", "-o", tmp_path / "out"], capsys)


def test_error_booby_trapped_pickle_never_runs(tmp_path, capsys, weights):
    marker = tmp_path / "payload_ran"

    class Trap:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('payload ran')",)

    trapped = OrderedDict(weights["model"])
    trapped["blocks.0.mlp.act1.weight_numerator"] = Trap()
    torch.save(trapped, tmp_path / "trap.bin")
    err = _error([tmp_path / "trap.bin", "-o", tmp_path / "out"], capsys)
    assert "refusing to load" in err and "builtins.exec" in err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    (tmp_path / "garbage.bin").write_bytes(b"not a checkpoint")
    assert "not a readable PyTorch checkpoint" in _error([tmp_path / "garbage.bin", "-o", tmp_path / "out"], capsys)


# --------------------------------------------------------------------------------------------------------------------
# kat_timm.tools.hub helpers
# --------------------------------------------------------------------------------------------------------------------


def test_param_counts_of_the_card():
    assert hub.kat_num_params("kat_tiny_patch16_224") == 5_718_328
    assert hub.kat_num_params("kat_tiny_patch16_224", num_classes=0) == 5_718_328 - (192 * 1000 + 1000)


def test_model_card_lists_all_released_results():
    card = hub.model_card("kat_small_patch16_224", "vitft")
    assert card.startswith("---\n") and "\nlicense: mit\n" in card and "- imagenet-1k" in card
    rows = [line for line in card.splitlines() if line.startswith("| ") and "kat_" in line]
    assert len(rows) == 6
    assert rows[3] == "| **`kat_small_patch16_224.vitft`** | **ViT init** | **22.1M** | **82.0** |"  # this one
    for row in rows[:3] + rows[4:]:
        assert "**" not in row
    assert rows[0] == "| `kat_tiny_patch16_224` | from scratch | 5.7M | 74.6 |"
    plain = [row.replace("**", "") for row in rows]
    for i, (size, (scratch, vitft)) in enumerate(kat_timm.models.RELEASED_TOP1.items()):
        assert plain[2 * i].startswith(f"| `kat_{size}_patch16_224` | from scratch |")
        assert plain[2 * i].endswith(f"| {scratch:.1f} |")
        assert plain[2 * i + 1].startswith(f"| `kat_{size}_patch16_224.vitft` | ViT init |")
        assert plain[2 * i + 1].endswith(f"| {vitft:.1f} |")
    assert 'timm.create_model("kat_small_patch16_224.vitft", pretrained=True)' in card
    assert "Reported ImageNet-1k top-1:** 82.0%" in card
    gelu = hub.model_card("kat_tiny_gelu_patch16_224")
    assert "Reported ImageNet-1k top-1" not in gelu and "**`" not in gelu
    assert 'timm.create_model("hf-hub:OWNER/REPO", pretrained=True)' in gelu  # no registered weights to name


def test_hub_config_keeps_what_it_does_not_own():
    written = {"architecture": TINY, "model_args": {"num_classes": 7, "img_size": [32, 32]}, "pretrained_cfg": {}}
    fixed = hub.hub_config(written)
    assert fixed["num_classes"] == 7 and fixed["model_args"] == {"img_size": [32, 32]}
    assert written["model_args"]["num_classes"] == 7, "the input must not be modified"
    assert "model_args" not in hub.hub_config({"architecture": TINY, "model_args": {"num_classes": 3}})


def test_run_card_reports_the_training_of_the_published_checkpoint_only(tmp_path, weights):
    """A checkpoint of epoch 1 in a run folder whose summary.csv went on to epoch 3 (and was resumed at epoch 2, so
    epoch 2 has two rows): the card's epochs and scores are those of the weights published, not of later epochs."""
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"epoch": 1, "arch": TINY, "state_dict": weights["model"],
                "args": {"model": TINY, "pretrained": False, "data_dir": "shapes"}}, run / "checkpoint-1.pth.tar")
    rows = [(0, 40.0), (1, 50.0), (2, 90.0), (2, 95.0), (3, 99.0)]
    (run / "summary.csv").write_text("epoch,train_loss,eval_top1,eval_top5\n"
                                     + "".join(f"{e},1.0,{top1},100.0\n" for e, top1 in rows))
    hub.convert_checkpoint(run / "checkpoint-1.pth.tar", tmp_path / "out", verify=False)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "**Epochs trained:** 2 (epochs 0-1, summary.csv)" in card, card
    assert "**Final validation (epoch 1):** top-1 50.00%" in card, card
    assert "**Best validation (epoch 1):** top-1 50.00%" in card, card
    assert "epoch 2" not in card and "epoch 3" not in card and "99.00" not in card and "95.00" not in card


def test_a_link_into_a_missing_folder_among_the_outputs_writes_nothing(tmp_path, capsys, weights):
    path = _save_released(weights["model"], tmp_path / "pytorch_model.bin")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README.md").symlink_to(tmp_path / "gone" / "README.md")
    err = _error([path, "-o", tmp_path / "out", "--force"], capsys)
    assert f"README.md: a symbolic link to {tmp_path / 'gone' / 'README.md'}, whose folder" in err, err
    assert err.count("\n") == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md"], "nothing written"


def test_error_output_in_the_checkpoints_folder_says_what_to_give(tmp_path, capsys, weights):
    path = _save_released(weights["model"], tmp_path / "pytorch_model.bin")
    err = _error([path, "-o", tmp_path], capsys)
    assert (f"the output folder {tmp_path} is the folder the checkpoint pytorch_model.bin is in; give a new or empty "
            "folder") in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pytorch_model.bin"]
