"""``kat-timm demo``: the op check, released or random weights with the plain message, predictions on the bundled
images, the KAT vs ViT throughput, and the sample images' size and licence notes. Offline (fake Hub cache)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

import kat_timm.ops
from kat_timm.cli import demo
from kat_timm.cli.common import create_model
from kat_timm.cli.predict import class_labeller, format_predictions, predict, read_images
from kat_timm.ops import group_rational_autograd

pytestmark = pytest.mark.usefixtures("single_thread")

OFFLINE_MESSAGE = ("Could not fetch the released weights (offline mode (HF_HUB_OFFLINE=1), and they are not in the "
                   "local Hugging Face cache")
CONTINUING = "); continuing with random weights: predictions below are meaningless."


def _demo(capsys, *args):
    code = demo.main(["--device", "cpu", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_released_weights_give_their_predictions(capsys, released_hub):
    code, out, err = _demo(capsys, "--skip-benchmark")
    assert code == 0, err
    assert "1. Rational op on backend 'native'" in out and "PASS (tolerance 1e-04)" in out
    assert "released weights from adamdad/kat_tiny_patch16_224, ImageNet-1k top-1 74.6% as released" in out
    assert "5,718,328 parameters" in out
    assert "Could not fetch" not in out and "meaningless" not in out
    # The predictions printed are those of the cached weights, formatted as kat-timm predict does.
    model = create_model("kat_tiny", pretrained=True)
    paths = demo.sample_images()
    expected = format_predictions([p.name for p in paths], predict(model, read_images(paths), class_labeller(model)),
                                  indent="   ")
    assert expected in out
    assert "4. Throughput: skipped (--skip-benchmark)" in out


def test_offline_says_so_plainly_and_goes_on_with_random_weights(capsys, offline_hub):
    code, out, err = _demo(capsys, "--skip-benchmark")
    assert code == 0, err
    weights_line = next(line for line in out.splitlines() if "released weights" in line)
    assert weights_line.strip().startswith(OFFLINE_MESSAGE) and weights_line.endswith(CONTINUING)
    assert "3. Top-5 predictions on the bundled sample images (random weights: meaningless):" in out
    for path in demo.sample_images():
        assert f"   {path.name}\n     1. " in out


def test_offline_flag_and_benchmark(capsys, offline_hub):
    code, out, err = _demo(capsys, "--offline", "--batch", "1", "--reps", "1")
    assert code == 0, err
    assert "Could not fetch the released weights (offline mode" in out
    section = out.split("4. Inference throughput, batch 1, median of 1, cpu: ", 1)[1].splitlines()
    assert section[0].endswith(" 1 thread") or ", 1 thread, load average" in section[0]
    rates = {}
    for line in section[1:3]:
        name, rate, unit = line.split()
        assert unit == "images/s"
        rates[name] = float(rate)
    assert set(rates) == {"kat_tiny", "vit_tiny_patch16_224"} and min(rates.values()) > 0
    # Issue 22, item 11: a time ratio as in the README's tables (it was the throughput ratio, labelled "KAT / ViT").
    label, ratio = section[3].split(": ", 1)
    assert label == "   KAT / ViT time per image" and ratio.endswith("x (above 1: KAT is slower)"), section[3]
    ratio = float(ratio.split("x ")[0])
    assert ratio == pytest.approx(rates["vit_tiny_patch16_224"] / rates["kat_tiny"], rel=0.02)


def test_a_wrong_backend_fails_the_demo(capsys, monkeypatch, offline_hub):
    def off_by_a_thousandth(x, numerator, denominator, channel_dim=-1):
        return group_rational_autograd(x, numerator, denominator, channel_dim) * 1.001

    monkeypatch.setattr(kat_timm.ops, "group_rational", off_by_a_thousandth)
    code, out, err = _demo(capsys, "--skip-benchmark")
    assert code == 1
    assert "   FAIL (tolerance 1e-04)" in out
    assert "FAIL: the 'native' backend disagrees with the reference (output, grad x" in err
    assert "3. Top-5 predictions" in out, "the demo goes on after a failed check"


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_op_check_passes_on_each_cpu_backend(use_backend, backend):
    use_backend(backend)
    check = demo.check_op(torch.device("cpu"))
    assert check.backend == backend
    assert set(check.errors) == {"output", "grad x", "grad numerator", "grad denominator"}
    assert check.passed and max(check.errors.values()) < 1e-5, check.errors


def test_op_check_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    demo.check_op(torch.device("cpu"))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_option_errors(capsys, offline_hub):
    assert _demo(capsys, "--reps", "0")[0] == 2
    code, _, err = _demo(capsys, "--model", "kat_huge", "--skip-benchmark")
    assert code == 2 and "unknown model 'kat_huge'" in err


def test_vit_counterparts():
    assert demo.vit_counterpart("kat_tiny") == "vit_tiny_patch16_224"
    assert demo.vit_counterpart("kat_small.vitft") == "vit_small_patch16_224"
    assert demo.vit_counterpart("kat_base_gelu_patch16_224") == "vit_base_patch16_224"
    assert demo.vit_counterpart("resnet50") is None


def test_sample_images_are_small_readable_and_licensed():
    paths = demo.sample_images()
    assert len(paths) >= 2
    assert sum(path.stat().st_size for path in paths) < 300_000
    notes = (paths[0].parent / "README.md").read_text(encoding="utf-8")
    for path in paths:
        assert f"`{path.name}`" in notes, f"{path.name}: origin and licence missing from assets/README.md"
        with Image.open(path) as image:
            assert min(image.size) >= 224 and max(image.size) <= 320, path.name


def test_bad_model_name_fails_before_the_op_check(capsys, offline_hub):
    assert demo.main(["--model", "kat_tiny.bogus", "--skip-benchmark"]) == 2
    captured = capsys.readouterr()
    assert "no pretrained tag 'bogus'" in captured.err
    assert "Rational op" not in captured.out


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_a_model_that_is_not_a_kat_is_refused_before_the_op_check(capsys, offline_hub, name):
    assert demo.main(["--model", name, "--skip-benchmark"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"kat-timm demo: error: --model {name}: not a KAT model; the demo runs a KAT (kat_tiny, "
                            "kat_small, kat_base, with an optional .tag, or hf-hub:/local-dir: names of one)\n")
    assert "Rational op" not in captured.out


def test_a_hub_repo_that_is_not_a_kat_is_refused(capsys, offline_hub):
    offline_hub.add_config("someone/resnet", {"architecture": "resnet18", "num_classes": 10, "pretrained_cfg": {}})
    assert demo.main(["--model", "hf-hub:someone/resnet", "--skip-benchmark", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == ("kat-timm demo: error: --model hf-hub:someone/resnet: its architecture ResNet "
                                       "is not a KAT\n")
