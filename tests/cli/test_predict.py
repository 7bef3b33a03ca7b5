"""``kat-timm predict``: labels and probabilities from the right weights, errors that name the problem (the Hub
access it shares with every command is tested in test_common.py).

Run in-process through ``main([...])``, offline: released weights come from the fake cache (``released_hub``).
"""
from __future__ import annotations

import json
import time

import pytest
import timm
import torch
from timm.data import ImageNetInfo

from kat_timm.cli import predict
from kat_timm.cli.demo import sample_images

IMAGES = [str(path) for path in sample_images()]

# Building KATs on a busy 2-core machine is several times faster on one thread.
pytestmark = pytest.mark.usefixtures("single_thread")


def _with_head(state_dict, num_classes: int):
    """A copy of a kat_tiny state dict with a fresh ``num_classes``-way classifier (a fine-tuned checkpoint)."""
    state_dict = dict(state_dict)
    state_dict["head.weight"] = 0.05 * torch.randn(num_classes, state_dict["head.weight"].shape[1])
    state_dict["head.bias"] = 0.1 * torch.randn(num_classes)
    return state_dict


def _run(capsys, *args):
    code = predict.main([*args, "--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _expected_top(state_dict, k: int, num_classes: int = 1000):
    """Top-k (indices, probabilities) per sample image, computed here with the weights loaded by hand."""
    model = timm.create_model("kat_tiny", num_classes=num_classes, weight_init="skip")
    model.load_state_dict(state_dict)
    images = predict.read_images(sample_images())
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config(model=model))
    with torch.inference_mode():
        probabilities = model.eval()(torch.stack([transform(image) for image in images])).softmax(-1)
    values, indices = probabilities.topk(k, dim=-1)
    return indices.tolist(), values.tolist()


def test_json_gives_the_released_weights_top5_with_imagenet_labels(capsys, released_hub, kat_tiny_weights):
    code, out, err = _run(capsys, *IMAGES, "--model", "kat_tiny", "--json")
    assert code == 0, err
    records = json.loads(out)
    indices, probabilities = _expected_top(kat_tiny_weights["scratch"], 5)
    info = ImageNetInfo("imagenet-1k")
    assert [record["image"] for record in records] == IMAGES
    for record, want_indices, want_probabilities in zip(records, indices, probabilities):
        assert record["weights"] == "released" and record["model"] == "kat_tiny"
        got = record["predictions"]
        assert [p["index"] for p in got] == want_indices, "not the predictions of the cached released weights"
        assert [p["probability"] for p in got] == pytest.approx(want_probabilities, rel=1e-4)
        assert [p["label"] for p in got] == [info.index_to_description(i) for i in want_indices]
    assert "meaningless" not in out + err


def test_text_output_honours_top_k_and_batches(capsys, released_hub, kat_tiny_weights):
    # Three images in batches of two: the second batch holds one image.
    code, out, err = _run(capsys, *IMAGES, IMAGES[0], "--model", "kat_tiny", "--top-k", "3", "--batch-size", "2")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("kat_tiny (released weights)")
    blocks = [lines[i:i + 4] for i in range(1, len(lines), 4)]
    assert [block[0] for block in blocks] == [*IMAGES, IMAGES[0]]
    indices, probabilities = _expected_top(kat_tiny_weights["scratch"], 3)
    info = ImageNetInfo("imagenet-1k")
    for block, want_indices, want_probabilities in zip(blocks, indices + indices[:1], probabilities):
        assert [line.split()[0] for line in block[1:]] == ["1.", "2.", "3."]
        assert block[1].endswith(info.index_to_description(want_indices[0]))
        assert f"{100 * want_probabilities[0]:6.2f}%" in block[1]


def test_random_weights_say_the_predictions_are_meaningless(capsys, offline_hub):
    code, out, err = _run(capsys, IMAGES[0], "--model", "kat_tiny", "--random-weights", "--top-k", "2")
    assert code == 0, err
    assert "meaningless" in out and "meaningless" in err
    code, out, err = _run(capsys, IMAGES[0], "--model", "kat_tiny", "--random-weights", "--json")
    assert code == 0, err
    assert json.loads(out)[0]["weights"] == "random"
    assert "meaningless" in err


def test_checkpoint_with_ten_classes_prints_indices_or_class_map_names(capsys, tmp_path, kat_tiny_weights):
    state_dict = _with_head(kat_tiny_weights["scratch"], 10)
    checkpoint = tmp_path / "finetuned.pth"
    torch.save({"state_dict": state_dict, "epoch": 3}, checkpoint)
    indices, _ = _expected_top(state_dict, 3, num_classes=10)

    code, out, err = _run(capsys, *IMAGES, "--model", "kat_tiny", "--checkpoint", str(checkpoint), "--top-k", "3",
                          "--json")
    assert code == 0, err
    records = json.loads(out)
    assert records[0]["weights"] == f"checkpoint {checkpoint}"
    for record, want in zip(records, indices):
        assert all(0 < p["probability"] < 1 for p in record["predictions"])
        assert [p["index"] for p in record["predictions"]] == want
        assert [p["label"] for p in record["predictions"]] == [f"class {i}" for i in want]

    names = [f"flower_{i}" for i in range(10)]
    class_map = tmp_path / "classes.txt"
    class_map.write_text("\n".join(names) + "\n")
    code, out, err = _run(capsys, *IMAGES, "--model", "kat_tiny", "--checkpoint", str(checkpoint),
                          "--class-map", str(class_map), "--json")
    assert code == 0, err
    for record, want in zip(json.loads(out), indices):
        assert [p["label"] for p in record["predictions"]][:3] == [names[i] for i in want]

    class_map.write_text("\n".join(names[:9]) + "\n")
    code, out, err = _run(capsys, IMAGES[0], "--model", "kat_tiny", "--checkpoint", str(checkpoint),
                          "--class-map", str(class_map))
    assert code == 1 and "9 class names for a classifier of 10 classes" in err


def test_top_k_is_capped_at_the_number_of_classes(capsys, tmp_path, ckpt, kat_tiny_weights):
    checkpoint = ckpt.save_released(_with_head(kat_tiny_weights["vitft"], 3), tmp_path / "three.bin")
    code, out, err = _run(capsys, IMAGES[0], "--model", "kat_tiny", "--checkpoint", str(checkpoint), "--json")
    assert code == 0, err
    got = json.loads(out)[0]["predictions"]
    assert sorted(p["index"] for p in got) == [0, 1, 2]
    assert sum(p["probability"] for p in got) == pytest.approx(1.0, abs=1e-5)


def _png_header_only(path, width: int, height: int) -> None:
    """A 1-bit greyscale PNG of ``width`` x ``height`` that declares its size and holds no pixels (a few bytes: PIL
    reads the size from the header alone, which is all a decompression-bomb check needs)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


def test_an_image_too_large_to_open_safely_is_named_and_the_others_classified(capsys, tmp_path, offline_hub):
    bomb = tmp_path / "huge.png"
    _png_header_only(bomb, 20000, 20000)
    code, out, err = _run(capsys, IMAGES[0], str(bomb), "--random-weights", "--model", "kat_tiny")
    assert code == 1
    assert err.strip().splitlines()[-1] == (f"kat-timm predict: error: {bomb}: too many pixels for PIL to open safely "
                                            "(400,000,000, limit 178,956,970: a possible decompression bomb); "
                                            "downscale it"), err
    assert f"{IMAGES[0]}\n  1. " in out and str(bomb) not in out


def test_unreadable_and_missing_images_are_named(capsys, tmp_path, offline_hub):
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("this is text")
    code, _, err = _run(capsys, IMAGES[0], str(not_an_image), "--random-weights")
    assert code == 1 and f"{not_an_image}: not an image file" in err
    code, _, err = _run(capsys, str(tmp_path / "missing.png"), "--random-weights")
    assert code == 1 and "missing.png: no such file" in err
    code, _, err = _run(capsys, str(tmp_path), "--random-weights")
    assert code == 1 and "is a directory" in err


def test_model_and_option_errors(capsys, tmp_path, offline_hub):
    code, _, err = _run(capsys, IMAGES[0], "--model", "kat_tinyy", "--random-weights")
    assert code == 2 and "unknown model 'kat_tinyy'" in err
    code, _, err = _run(capsys, IMAGES[0], "--model", "kat_tiny.nope")
    assert code == 2 and "kat_tiny has no pretrained tag 'nope'; its pretrained names: kat_tiny, kat_tiny.vitft" in err
    code, _, err = _run(capsys, IMAGES[0], "--checkpoint", str(tmp_path / "w.pth"), "--random-weights")
    assert code == 2 and "not both" in err
    code, _, err = _run(capsys, IMAGES[0], "--random-weights", "--top-k", "0")
    assert code == 2 and "--top-k" in err
    code, _, err = _run(capsys, IMAGES[0], "--model", "kat_tiny", "--checkpoint", str(tmp_path / "w.pth"))
    assert code == 1 and "w.pth" in err


def test_missing_released_weights_say_how_to_get_them(capsys, offline_hub):
    start = time.perf_counter()
    code, _, err = _run(capsys, IMAGES[0], "--model", "kat_tiny")
    assert code == 1
    assert "could not load the released weights of kat_tiny" in err and "offline mode" in err
    assert "kat-timm download kat_tiny" in err and "--random-weights" in err and "--checkpoint" in err
    assert len(err.strip().splitlines()) == 1, err
    assert time.perf_counter() - start < 20


# ---------------------------------------------------------------------------------------------------------------------
# Reaching the Hub
# ---------------------------------------------------------------------------------------------------------------------


def test_kat_timm_dispatches_to_predict(capsys, tmp_path):
    from kat_timm.cli import main as kat_timm_main

    assert kat_timm_main(["predict", str(tmp_path / "nothing.jpg"), "--random-weights"]) == 1
    assert capsys.readouterr().err == f"kat-timm predict: error: {tmp_path / 'nothing.jpg'}: no such file\n"


def test_kat_train_checkpoint_at_32_px_is_built_at_its_size_and_labelled_with_its_classes(capsys, tmp_path):
    import argparse

    from tests.conftest import random_kat_state_dict

    classes = ["blue", "green", "red"]
    state_dict = random_kat_state_dict(5, img_size=32, num_classes=3)
    checkpoint = tmp_path / "model_best.pth.tar"
    # What kat-train saves: timm's CheckpointSaver layout, the run's arguments as a Namespace.
    torch.save({"epoch": 1, "arch": "kat_tiny", "state_dict": state_dict,
                "args": argparse.Namespace(img_size=32, input_size=None, class_names=classes)}, checkpoint)
    code, out, err = _run(capsys, *IMAGES, "--model", "kat_tiny", "--checkpoint", str(checkpoint), "--json")
    assert code == 0, err

    model = timm.create_model("kat_tiny", img_size=32, num_classes=3, weight_init="skip")
    model.load_state_dict(state_dict)
    transform = timm.data.create_transform(**{**timm.data.resolve_data_config(model=model), "input_size": (3, 32, 32)})
    with torch.inference_mode():
        logits = model.eval()(torch.stack([transform(image) for image in predict.read_images(sample_images())]))
    for record, want in zip(json.loads(out), logits.softmax(-1)):
        got = {p["label"]: p["probability"] for p in record["predictions"]}
        assert got == pytest.approx({name: p for name, p in zip(classes, want.tolist())}, abs=1e-5)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode.startswith("I")
    pixels = np.asarray(predict.read_images([tmp_path / "ramp16.png"])[0]).astype(np.int64)
    assert pixels.shape == (64, 64, 3)
    np.testing.assert_allclose(pixels[..., 0], np.rint(ramp / 257), atol=1)  # PIL's convert("RGB") gives 255s
    Image.fromarray(np.full((8, 8), 200, dtype=np.int32)).save(tmp_path / "eight_bit_as_i.tiff")
    assert np.asarray(predict.read_images([tmp_path / "eight_bit_as_i.tiff"])[0]).max() == 200


def test_checkpoint_without_model_builds_the_architecture_it_records(capsys, tmp_path, kat_tiny_weights):
    """Issue 11, item 5: without --model, a kat_tiny_patch16_224 run's checkpoint built kat_base and failed."""
    import argparse

    checkpoint = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 2, "arch": "kat_tiny_patch16_224", "state_dict": kat_tiny_weights["vitft"],
                "args": argparse.Namespace(model="kat_tiny_patch16_224", img_size=None, num_classes=1000)},
               checkpoint)
    reads = []
    real_load = torch.load
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "load", lambda *a, **k: reads.append(a[0]) or real_load(*a, **k))
        code, out, err = _run(capsys, IMAGES[0], "--checkpoint", str(checkpoint), "--json")
    assert code == 0, err
    assert reads == [checkpoint], "predict must read the checkpoint once"
    record = json.loads(out)[0]
    assert record["model"] == "kat_tiny_patch16_224"
    indices, _ = _expected_top(kat_tiny_weights["vitft"], 5)
    assert [p["index"] for p in record["predictions"]] == indices[0]
    code, _, err = _run(capsys, IMAGES[0], "--checkpoint", str(checkpoint), "--model", "kat_small")
    assert code == 1 and "does not fit kat_small: it holds a kat_tiny_patch16_224" in err


def test_every_bad_image_is_named_and_the_good_ones_are_classified(capsys, tmp_path, offline_hub):
    text = tmp_path / "notes.jpg"
    text.write_text("this is text")
    missing = tmp_path / "missing.png"
    code, out, err = _run(capsys, str(text), IMAGES[0], str(missing), IMAGES[1], "--model", "kat_tiny",
                          "--random-weights", "--json")
    assert code == 1
    assert [record["image"] for record in json.loads(out)] == [IMAGES[0], IMAGES[1]]
    assert f"{text}: not an image file" in err and f"{missing}: no such file" in err
    code, _, err = _run(capsys, str(text), str(missing), "--random-weights")
    assert code == 1 and f"{text}: not an image file" in err and f"{missing}: no such file" in err
