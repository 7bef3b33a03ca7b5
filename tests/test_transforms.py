"""``kat_timm.create_transform``: the released evaluation preprocessing (bicubic resize to 256, centre crop 224,
ImageNet mean/std), checked by inspecting the pipeline and against a hand-built torchvision pipeline."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform as timm_create_transform
from timm.data import resolve_data_config
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from kat_timm.transforms import create_transform

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def kat_tiny():
    return timm.create_model("kat_tiny", weight_init="skip")


@pytest.fixture
def photo() -> Image.Image:
    """A non-square RGB image with structure at every scale (so resize and crop mistakes show)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:300, 0:400]
    base = np.stack([x * 255 / 400, y * 255 / 300, (x + y) % 64 * 4], axis=-1)
    noise = rng.integers(0, 40, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def _reference_pipeline():
    return T.Compose([
        T.Resize(256, interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(224),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def test_eval_pipeline_of_kat_tiny_is_the_released_one(kat_tiny):
    steps = create_transform(kat_tiny).transforms
    assert [type(step).__name__ for step in steps] == ["Resize", "CenterCrop", "MaybeToTensor", "Normalize"]
    resize, crop, _, normalize = steps
    assert resize.size == 256 and resize.interpolation == InterpolationMode.BICUBIC
    assert tuple(crop.size) == (224, 224)
    torch.testing.assert_close(normalize.mean, torch.tensor(IMAGENET_MEAN))
    torch.testing.assert_close(normalize.std, torch.tensor(IMAGENET_STD))


def test_output_equals_a_hand_built_torchvision_pipeline(kat_tiny, photo):
    actual = create_transform(kat_tiny)(photo)
    expected = _reference_pipeline()(photo)
    assert actual.shape == (3, 224, 224) and actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    bilinear = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    assert not torch.equal(actual, bilinear(photo)), "the interpolation is bicubic, not torchvision's bilinear"


def test_same_as_the_documented_timm_calls(kat_tiny, photo):
    documented = timm_create_transform(**resolve_data_config(model=kat_tiny))
    assert torch.equal(create_transform(kat_tiny)(photo), documented(photo))


def test_a_name_gives_the_same_pipeline_without_building_a_model(kat_tiny, photo):
    for name in ("kat_tiny", "kat_base_patch16_224.vitft"):
        assert torch.equal(create_transform(name)(photo), create_transform(kat_tiny)(photo)), name
    with pytest.raises(ValueError, match="unknown model 'kat_huge'"):
        create_transform("kat_huge")


def test_overrides_and_training_pipeline(kat_tiny, photo):
    assert create_transform(kat_tiny, input_size=(3, 160, 160))(photo).shape == (3, 160, 160)
    resize = create_transform(kat_tiny, crop_pct=1.0).transforms[0]
    assert resize.size == 224
    train = create_transform(kat_tiny, is_training=True)
    assert type(train.transforms[0]).__name__ == "RandomResizedCropAndInterpolation"
    assert train(photo).shape == (3, 224, 224)


def test_a_model_built_for_another_size_gets_images_of_that_size(photo):
    model = timm.create_model("kat_tiny", img_size=48, weight_init="skip")
    assert create_transform(model)(photo).shape == (3, 48, 48)  # timm's data config alone says 224
    model.set_input_size(img_size=(64, 64))
    assert create_transform(model)(photo).shape == (3, 64, 64)
    assert create_transform(model, input_size=(3, 32, 32))(photo).shape == (3, 32, 32), "overrides still win"
