"""kat_timm.factory: one way to build a model from a name, a checkpoint, or both; each file read once."""
import argparse

import pytest
import torch

import kat_timm  # noqa: F401  (registers the models)
from kat_timm import checkpoint as checkpoint_module
from kat_timm.checkpoint import CheckpointError
from kat_timm.factory import create_model, infer_architecture, read_checkpoint
from tests.conftest import random_kat_state_dict

TINY = "kat_tiny_patch16_224"


@pytest.fixture(scope="module")
def tiny_32():
    """A kat_tiny state dict for 32 px images and 10 classes."""
    return random_kat_state_dict(7, img_size=32, num_classes=10, weight_init="skip")


@pytest.fixture
def count_reads(monkeypatch):
    """How many times a checkpoint file is read (torch.load and safetensors loads)."""
    import safetensors.torch

    reads = []
    real_load, real_safe = torch.load, safetensors.torch.load_file
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(a[0]) or real_load(*a, **k))
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: reads.append(a[0]) or real_safe(*a, **k))
    return reads


def _assert_same_weights(model, state_dict):
    for key, value in state_dict.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_name_only_builds_the_named_model():
    model = create_model("kat_tiny", img_size=32, num_classes=3, weight_init="skip")
    assert model.patch_embed.img_size == (32, 32) and model.num_classes == 3
    with pytest.raises(ValueError, match="needs a model name or a checkpoint"):
        create_model()


def test_kat_train_checkpoint_brings_its_architecture_and_arguments(tmp_path, tiny_32, count_reads):
    path = tmp_path / "last.pth.tar"
    args = {"model": "kat_tiny", "img_size": 32, "num_classes": 10, "model_kwargs": {"drop_path_rate": 0.1},
            "class_names": [f"c{i}" for i in range(10)]}
    torch.save({"epoch": 3, "state_dict": tiny_32, "args": args}, path)
    loaded = read_checkpoint(path)
    assert (loaded.architecture, loaded.source, loaded.raw["epoch"]) == ("kat_tiny", "state_dict", 3)
    assert loaded.model_kwargs == {"drop_path_rate": 0.1, "num_classes": 10, "img_size": 32}
    model = create_model(checkpoint=loaded)
    assert count_reads == [path], "the file must be read once"
    assert model.patch_embed.img_size == (32, 32) and model.num_classes == 10
    assert model.pretrained_cfg["label_names"] == tuple(args["class_names"])
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # the recorded rate
    _assert_same_weights(model, tiny_32)


def test_timm_train_checkpoint_args_namespace(tmp_path, tiny_32, count_reads):
    """timm's train.py saves args as a Namespace and the model name as ``arch``; --img-size there is data only."""
    path = tmp_path / "model_best.pth.tar"
    args = argparse.Namespace(model=TINY, img_size=32, input_size=None, num_classes=10,
                              model_kwargs={"img_size": 32})
    ema = {k: v + 1 for k, v in tiny_32.items()}
    torch.save({"arch": TINY, "state_dict": tiny_32, "state_dict_ema": ema, "args": args}, path)
    model = create_model(checkpoint=path)  # EMA first, as timm's load_checkpoint does
    assert count_reads == [path]
    assert model.patch_embed.img_size == (32, 32) and model.num_classes == 10
    _assert_same_weights(model, ema)
    _assert_same_weights(create_model(TINY, checkpoint=path, use_ema=False), tiny_32)


def test_bare_state_dict_architecture_inferred(tmp_path, tiny_32, count_reads):
    path = tmp_path / "weights.bin"
    torch.save({"module." + k: v for k, v in tiny_32.items()}, path)  # a DDP prefix, as saved from a wrapped model
    loaded = read_checkpoint(path)
    assert loaded.architecture == TINY and loaded.source == "" and loaded.args == {}
    assert loaded.model_kwargs == {"img_size": 32, "num_classes": 10}
    model = create_model(checkpoint=loaded)
    assert count_reads == [path]
    assert type(model).__name__ == "KAT" and model.embed_dim == 192 and model.patch_embed.img_size == (32, 32)
    _assert_same_weights(model, tiny_32)


def test_safetensors_read_once(tmp_path, tiny_32, count_reads):
    import safetensors.torch

    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in tiny_32.items()}, str(path))
    model = create_model("kat_tiny", checkpoint=path)
    assert count_reads == [str(path)] and model.num_classes == 10


def test_given_options_override_the_recorded_ones(tmp_path, tiny_32):
    path = tmp_path / "weights.bin"
    torch.save(tiny_32, path)
    model = create_model("kat_tiny", checkpoint=path, img_size=48)  # position embedding resampled 2x2 -> 3x3
    assert model.patch_embed.img_size == (48, 48) and model.pos_embed.shape[1] == 1 + 9


def test_conflicting_name_is_a_clear_error(tmp_path, tiny_32):
    path = tmp_path / "last.pth.tar"
    torch.save({"state_dict": tiny_32, "args": {"model": "kat_tiny"}}, path)
    assert create_model("kat_tiny_patch16_224", checkpoint=path).embed_dim == 192  # the same architecture
    with pytest.raises(CheckpointError, match="holds a kat_tiny, not a kat_small_patch16_224"):
        create_model("kat_small_patch16_224", checkpoint=path)
    with pytest.raises(ValueError, match="not both"):
        create_model("kat_tiny", checkpoint=path, pretrained=True)


def test_checkpoint_errors_are_one_line(tmp_path, tiny_32):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "missing.pth")
    torch.save(tiny_32, tmp_path / "bare.bin")
    with pytest.raises(CheckpointError, match="EMA weights requested"):
        read_checkpoint(tmp_path / "bare.bin", use_ema=True)
    partial = dict(tiny_32)
    del partial["blocks.3.mlp.act2.weight_denominator"]
    torch.save(partial, tmp_path / "partial.bin")
    with pytest.raises(CheckpointError, match="missing 1 of 48 rational coefficient tensors") as caught:
        create_model(checkpoint=tmp_path / "partial.bin")
    assert "\n" not in str(caught.value)
    broken = dict(tiny_32, **{"head.bias": torch.full((10,), float("nan"))})
    torch.save(broken, tmp_path / "nan.bin")
    with pytest.raises(CheckpointError, match=r"non-finite values .* in head.bias"):
        create_model(checkpoint=tmp_path / "nan.bin")
    odd = {k: v for k, v in tiny_32.items() if not k.startswith("blocks.11.")}
    torch.save(odd, tmp_path / "odd.bin")
    with pytest.raises(CheckpointError, match="records no model name and its shapes match no released KAT"):
        create_model(checkpoint=tmp_path / "odd.bin")
    with pytest.raises(CheckpointError, match="does not fit kat_tiny: KAT checkpoint is missing 4 of 48"):
        create_model("kat_tiny", checkpoint=tmp_path / "odd.bin")
    with pytest.raises(CheckpointError) as caught:
        create_model("kat_tiny", checkpoint=tmp_path / "bare.bin", num_classes=5)
    message = str(caught.value)  # torch's "Error(s) in loading state_dict for KAT:" header is not glued on
    assert "does not fit kat_tiny: size mismatch for head.weight" in message and "for KAT:" not in message


def test_checkpoint_module_does_not_import_models():
    """models/kat.py imports kat_timm.checkpoint, so it must import nothing of kat_timm (not even in a function)."""
    import ast

    tree = ast.parse(open(checkpoint_module.__file__).read())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in imported if name.startswith(("kat_timm", "."))] and "" not in imported


def _shape_only(embed_dim: int, depth: int = 12, tokens: int = 197):
    sd = {"patch_embed.proj.weight": torch.empty(embed_dim, 3, 16, 16), "pos_embed": torch.empty(1, tokens, embed_dim)}
    for i in range(depth):
        sd[f"blocks.{i}.mlp.act1.weight_numerator"] = torch.empty(1, 6)
    return sd


@pytest.mark.parametrize("size, dim", [("tiny", 192), ("small", 384), ("base", 768)])
def test_infer_architecture(size, dim):
    assert infer_architecture(_shape_only(dim)) == f"kat_{size}_patch16_224"


def test_infer_architecture_rejects_other_grids():
    with pytest.raises(CheckpointError, match="pos_embed of 145 tokens"):
        infer_architecture(_shape_only(192, tokens=145))
