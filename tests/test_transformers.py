"""KAT through Hugging Face transformers' timm wrapper: the folders we write and the released Hub format.

Random kat_tiny models (every tensor jittered), 224 px because a released-format config.json has no ``model_args``
and transformers then builds the architecture's default size. Offline: a converted folder on disk, and a fake Hub
cache (``offline_hub``) holding a repo in the released format and an upload of the converted folder.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers  # noqa: F401  (in .[dev] and .[hf]; a missing one fails here, it is not skipped)

import kat_timm  # noqa: F401  (registers the KAT models in timm; transformers builds them through timm)
import timm
from kat_timm.tools import hub
from tests.helpers import one_thread_env, torch_threads

REPO = Path(__file__).resolve().parents[1]
TINY = "kat_tiny_patch16_224"
IMAGE = REPO / "kat_timm" / "assets" / "grace_hopper.jpg"
RATIONAL = ("weight_numerator", "weight_denominator")


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """scripts/convert_checkpoint.py's output for a fine-tuned kat_tiny with a 10-class head."""
    from tests.conftest import random_kat_state_dict, save_released

    with torch_threads(1):
        root = tmp_path_factory.mktemp("converted")
        state_dict = random_kat_state_dict(3001, weight_init="skip", num_classes=10)
        checkpoint = save_released(state_dict, root / "fine_tuned.bin")
        hub.convert_checkpoint(checkpoint, root / "out")
        return root / "out"


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224)


def test_converted_config_has_the_head_width_once(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["architecture"] == TINY and config["num_classes"] == 10
    assert "num_classes" not in config.get("model_args", {}), "TimmWrapper passes num_classes itself"
    assert config["pretrained_cfg"]["num_classes"] == 10


def test_fix_hub_folder_repairs_a_save_for_hf_folder(tmp_path, single_thread):
    """A folder written by timm's save_for_hf alone (what convert_checkpoint wrote before) is repaired in place and
    then loads in transformers with the same logits as timm."""
    from transformers import AutoModelForImageClassification

    from tests.conftest import random_kat_tiny_32

    model = random_kat_tiny_32(3002)
    timm.models.save_for_hf(model, str(tmp_path), safe_serialization=True)
    assert "num_classes" in json.loads((tmp_path / "config.json").read_text())["model_args"]
    with pytest.raises(TypeError, match="multiple values for keyword argument 'num_classes'"):
        AutoModelForImageClassification.from_pretrained(tmp_path)
    assert hub.fix_hub_folder(tmp_path) is True and hub.fix_hub_folder(tmp_path) is False
    wrapped = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    images = torch.randn(3, 3, 32, 32)  # model_args carry img_size=32, which the wrapper passes on
    with torch.no_grad():
        assert _relative(wrapped(pixel_values=images).logits, model(images)) <= 1e-5
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hub.fix_hub_folder(tmp_path / "missing")


def test_converted_folder_in_transformers_gives_timm_logits(converted, images, single_thread):
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(converted).eval()
    reference = timm.create_model(f"local-dir:{converted}", pretrained=True).eval()
    assert type(model).__name__ == "TimmWrapperForImageClassification" and model.config.num_labels == 10
    with torch.no_grad():
        logits, expected = model(pixel_values=images).logits, reference(images)
    assert logits.shape == (2, 10) and logits.dtype == torch.float32
    assert _relative(logits, expected) <= 1e-5, f"transformers vs timm: rel err {_relative(logits, expected):.2e}"


def test_image_processor_and_pipeline(converted, single_thread):
    from PIL import Image
    from transformers import AutoImageProcessor, pipeline

    image = Image.open(IMAGE).convert("RGB")
    reference = timm.create_model(f"local-dir:{converted}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(reference), is_training=False)
    expected = transform(image).unsqueeze(0)
    pixels = AutoImageProcessor.from_pretrained(converted)(image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    assert torch.allclose(pixels, expected, atol=1e-6), "the image processor must preprocess as timm does"

    with torch.no_grad():
        probabilities = reference(expected).softmax(-1)[0]
    classify = pipeline("image-classification", model=str(converted))
    results = classify(image, top_k=3)
    assert [r["label"] for r in results] == [f"LABEL_{int(i)}" for i in probabilities.topk(3).indices]
    scores = torch.tensor([r["score"] for r in results])
    assert torch.allclose(scores, probabilities.topk(3).values, rtol=1e-4), (scores, probabilities.topk(3).values)


def test_released_format_and_uploaded_folder_from_the_hub_cache(offline_hub, kat_tiny_weights, converted, images,
                                                                   single_thread):
    from transformers import AutoModelForImageClassification

    offline_hub.add_released(f"adamdad/{TINY}", kat_tiny_weights["scratch"])
    for name in ("config.json", "model.safetensors"):  # the converted folder, as uploaded
        offline_hub.add_file("someone/kat_tiny_ft", name, (converted / name).read_bytes())

    for repo_id, classes in ((f"adamdad/{TINY}", 1000), ("someone/kat_tiny_ft", 10)):
        model = AutoModelForImageClassification.from_pretrained(repo_id).eval()
        reference = timm.create_model(f"hf-hub:{repo_id}", pretrained=True).eval()
        assert model.config.num_labels == classes, repo_id
        with torch.no_grad():
            logits, expected = model(pixel_values=images).logits, reference(images)
        assert logits.shape == (2, classes)
        assert _relative(logits, expected) <= 1e-5, f"{repo_id}: rel err {_relative(logits, expected):.2e}"
    released = AutoModelForImageClassification.from_pretrained(f"adamdad/{TINY}")
    assert released.config.id2label[1].startswith("goldfish"), "ImageNet-1k label names of a 1000-class repo"

    from PIL import Image
    from transformers import AutoImageProcessor, pipeline

    image = Image.open(IMAGE).convert("RGB")
    reference = timm.create_model(f"hf-hub:adamdad/{TINY}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(reference), is_training=False)
    pixels = AutoImageProcessor.from_pretrained(f"adamdad/{TINY}")(image, return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixels, transform(image).unsqueeze(0), atol=1e-6)
    with torch.no_grad():
        best = int(reference(pixels).argmax())
    top = pipeline("image-classification", model=f"adamdad/{TINY}")(image, top_k=1)[0]
    assert top["label"] == released.config.id2label[best], (top, best)


def test_fine_tuning_through_the_wrapper_trains_the_rationals(converted, tmp_path, single_thread):
    """A new 3-class head (another size than the folder's) and a few AdamW steps: every rational coefficient
    gets a gradient and moves; the fine-tuned model saved by transformers loads back in timm and transformers."""
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(converted, num_labels=3, ignore_mismatched_sizes=True)
    assert model.timm_model.head.weight.shape == (3, 192)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(RATIONAL)}
    assert len(before) == 12 * 2 * 2
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, labels = torch.randn(4, 3, 224, 224), torch.tensor([0, 1, 2, 1])
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(pixel_values=images, labels=labels).loss
        loss.backward()
        for name, param in model.named_parameters():
            if name.endswith(RATIONAL):
                assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {name}"
        optimizer.step()
        losses.append(loss.item())
    moved = [n for n, p in model.named_parameters() if n in before and not torch.equal(p.detach(), before[n])]
    assert sorted(moved) == sorted(before), f"rationals that did not change: {sorted(set(before) - set(moved))}"
    assert all(torch.isfinite(torch.tensor(losses))), losses

    model.eval().save_pretrained(tmp_path / "fine_tuned")
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(pixel_values=images).logits
        in_timm = timm.create_model(f"local-dir:{tmp_path / 'fine_tuned'}", pretrained=True).eval()(images)
        again = AutoModelForImageClassification.from_pretrained(tmp_path / "fine_tuned").eval()
        reloaded = again(pixel_values=images).logits
    assert in_timm.shape == (2, 3) and _relative(in_timm, expected) <= 1e-5, "transformers' folder in timm"
    assert _relative(reloaded, expected) <= 1e-5, "transformers' folder in transformers"


def test_without_import_kat_timm_transformers_asks_for_a_timm_upgrade(converted):
    """What a user sees who forgot ``import kat_timm`` (README: "KAT in transformers" says what to do)."""
    code = (
        "from transformers import AutoModelForImageClassification\n"
        f"AutoModelForImageClassification.from_pretrained({str(converted)!r})\n"
    )
    env = one_thread_env(HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)  # nothing that could import kat_timm on the way
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode != 0
    assert "ImportError" in run.stderr and "upgrade timm" in run.stderr and TINY in run.stderr, run.stderr[-2000:]
    readme = (REPO / "README.md").read_text()
    assert "upgrade timm" in readme and "import kat_timm" in readme
