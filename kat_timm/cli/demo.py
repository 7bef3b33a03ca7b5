"""``kat-timm demo``: the first five minutes of KAT on this machine, offline-capable (README, "Command line"): the
op against its float64 reference (exit code 1 on FAIL), KAT-T's predictions on the bundled images, KAT vs ViT."""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from . import CLIError, run_main

__all__ = ["OpCheck", "check_op", "main", "sample_images", "time_inference"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Input of the op check: tokens (B, N, C) with C = 8 groups x 96 channels, as in a KAN's act2 of KAT-T.
OP_CHECK_SHAPE = (2, 50, 768)
OP_CHECK_GROUPS = 8
# max |op - reference| / max |reference| allowed per output; float32 kernels land near 1e-6.
OP_CHECK_TOLERANCE = 1e-4


def sample_images() -> List[Path]:
    """The sample images shipped in ``kat_timm/assets`` (origin and licence: ``kat_timm/assets/README.md``)."""
    folder = resources.files("kat_timm") / "assets"
    return sorted(Path(str(entry)) for entry in folder.iterdir() if entry.name.lower().endswith(IMAGE_SUFFIXES))


@dataclass
class OpCheck:
    """Result of :func:`check_op`: the backend that ran and its relative error per output."""

    backend: str
    shape: Tuple[int, ...]
    errors: Dict[str, float]
    tolerance: float

    @property
    def passed(self) -> bool:
        return all(error <= self.tolerance for error in self.errors.values())  # False for NaN too


def check_op(device: torch.device, shape: Tuple[int, ...] = OP_CHECK_SHAPE, groups: int = OP_CHECK_GROUPS,
             tolerance: float = OP_CHECK_TOLERANCE) -> OpCheck:
    """max |op - reference| / max |reference| of ``group_rational``'s forward and backward outputs (float32, a private
    generator's random input) on ``device`` against the float64 reference."""
    from kat_timm.ops import group_rational, group_rational_reference, select_backend

    generator = torch.Generator().manual_seed(0)
    x = (2 * torch.randn(shape, generator=generator)).to(device).requires_grad_()
    numerator = (0.5 * torch.randn(1, 6, generator=generator)).to(device).requires_grad_()
    denominator = (0.5 * torch.randn(groups, 4, generator=generator)).to(device).requires_grad_()
    grad_output = torch.randn(shape, generator=generator).to(device)
    backend = select_backend(x)
    y = group_rational(x, numerator, denominator)
    y.backward(grad_output)
    expected = group_rational_reference(x, numerator, denominator, -1, grad_output)
    actual = (y, x.grad, numerator.grad, denominator.grad)
    names = ("output", "grad x", "grad numerator", "grad denominator")
    errors = {name: ((got.detach().double() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
              for name, got, want in zip(names, actual, expected)}
    return OpCheck(backend=backend, shape=tuple(shape), errors=errors, tolerance=tolerance)


def _backend_detail(backend: str, device: torch.device) -> str:
    from kat_timm.ops import native_cpu_status, triton_status

    if backend == "native":
        return "fused native CPU kernel"
    if backend == "triton":
        return f"Triton kernels, {triton_status()[1]}"
    if device.type == "cpu":
        available, reason = native_cpu_status()
        return "pure PyTorch" + ("" if available else f" (native kernel unavailable: {reason})")
    return "pure PyTorch"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_inference(models: Dict[str, torch.nn.Module], batch: int, reps: int, device: torch.device,
                   image_size: int = 224) -> Dict[str, float]:
    """Images per second of each model's forward pass: the median of ``reps`` timed passes after a warm-up,
    interleaved across models so that a load change on a shared machine hits all of them alike."""
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    for model in models.values():
        model.eval()(images)
    times: Dict[str, List[float]] = {name: [] for name in models}
    for _ in range(reps):
        for name, model in models.items():
            _synchronize(device)
            start = time.perf_counter()
            model(images)
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: batch / statistics.median(values) for name, values in times.items()}


def vit_counterpart(model_name: str) -> Optional[str]:
    """timm's ViT of the same width, depth and heads as a KAT (``kat_tiny...`` -> ``vit_tiny_patch16_224``)."""
    match = re.match(r"^kat_(tiny|small|base)(?:_|\.|$)", model_name)
    return f"vit_{match.group(1)}_patch16_224" if match else None


def _check_is_kat(name: str) -> None:
    """Raise ``CLIError`` (code 2) unless ``name`` (a checked model name) is a KAT: the demo's steps need one."""
    from timm.models import is_model_in_modules, split_model_name_tag

    from .common import HF_HUB_PREFIX, LOCAL_DIR_PREFIX, local_dir_architecture

    if name.startswith(HF_HUB_PREFIX):
        return  # its config.json is read with the model (checked then)
    architecture = local_dir_architecture(name) if name.startswith(LOCAL_DIR_PREFIX) else name
    if not is_model_in_modules(split_model_name_tag(architecture)[0], ["kat"]):
        raise CLIError(f"--model {name}: not a KAT model; the demo runs a KAT (kat_tiny, kat_small, kat_base, with an "
                       "optional .tag, or hf-hub:/local-dir: names of one)", code=2)


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Check the rational op, classify the bundled sample images with KAT, and time "
                               "KAT against ViT on this machine. Works offline (random weights then).")
    parser.add_argument("--model", default="kat_tiny",
                        help="a KAT model name with an optional .tag, or hf-hub:OWNER/NAME or local-dir:FOLDER of "
                             "a KAT (default: kat_tiny)")
    parser.add_argument("--offline", action="store_true",
                        help="don't contact the Hugging Face Hub (released weights only from the local cache)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--batch", type=int, default=8, help="batch size of the throughput test (default: 8)")
    parser.add_argument("--reps", type=int, default=3, help="timed passes per model (default: 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: PyTorch's choice; 1 is steadier on a busy machine)")
    parser.add_argument("--skip-benchmark", action="store_true", help="skip the KAT vs ViT throughput test")
    return parser


def main(argv: Optional[List[str]] = None, prog: str = "kat-timm demo") -> int:
    """Entry point of ``kat-timm demo``."""
    args = build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    threads = torch.get_num_threads()
    try:
        return run_main(lambda: _run(args), prog)
    finally:
        torch.set_num_threads(threads)  # --threads: undone for callers that run main() in-process


def _run(args: argparse.Namespace) -> int:
    import timm

    from kat_timm import __version__
    from kat_timm.benchmark import device_name, load_average
    from kat_timm.models.kat import KAT
    from kat_timm.tools.hub import released_top1

    from .common import (ReleasedWeightsUnavailable, check_backend_setting, check_model_name, create_model,
                         resolve_device)
    from .predict import class_labeller, format_predictions, predict, read_images

    for option in ("batch", "reps", "threads"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise CLIError(f"--{option} must be >= 1", code=2)
    check_model_name(args.model)  # before the op check: a typo should not cost its time first
    _check_is_kat(args.model)
    check_backend_setting()
    device = resolve_device(args.device)
    check_backend_setting(device)  # and whether a forced backend runs on that device
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    count = torch.get_num_threads()
    threads = f", {count} thread{'s' if count != 1 else ''}" if device.type == "cpu" else ""
    print(f"kat-timm {__version__} demo on {device.type}: {device_name(device.type)}{threads}")
    print(f"torch {torch.__version__}, timm {timm.__version__}\n")

    check = check_op(device)
    print(f"1. Rational op on backend '{check.backend}' ({_backend_detail(check.backend, device)}) vs the float64 "
          f"reference, input {tuple(check.shape)} float32:")
    for name, error in check.errors.items():
        print(f"   {name:<17} max relative error {error:.1e}")
    print(f"   {'PASS' if check.passed else 'FAIL'} (tolerance {check.tolerance:.0e})\n")

    print(f"2. Model {args.model}")
    try:
        model = create_model(args.model, pretrained=True, offline=args.offline)
        cfg = model.pretrained_cfg
        top1 = released_top1(args.model.split(".", 1)[0], cfg.get("tag") or "")
        top1_text = f", ImageNet-1k top-1 {top1}% as released" if top1 is not None else ""
        print(f"   released weights from {cfg.get('hf_hub_id')}{top1_text}")
        random_weights = False
    except ReleasedWeightsUnavailable as error:
        print(f"   Could not fetch the released weights ({error.reason}); continuing with random weights: "
              "predictions below are meaningless.")
        model = create_model(args.model, pretrained=False)
        random_weights = True
    if not isinstance(model, KAT):  # an hf-hub: repo, whose architecture is known only now
        raise CLIError(f"--model {args.model}: its architecture {type(model).__name__} is not a KAT", code=2)
    model.to(device).eval()
    print(f"   {sum(p.numel() for p in model.parameters()):,} parameters\n")

    paths = sample_images()
    predictions = predict(model, read_images(paths), class_labeller(model), top_k=5, device=device)
    caveat = " (random weights: meaningless)" if random_weights else ""
    print(f"3. Top-5 predictions on the bundled sample images{caveat}:")
    print(format_predictions([path.name for path in paths], predictions, indent="   ") + "\n")

    vit_name = vit_counterpart(args.model)
    if args.skip_benchmark:
        print("4. Throughput: skipped (--skip-benchmark)")
    elif vit_name is None:
        print(f"4. Throughput: skipped ({args.model} has no ViT counterpart in timm)")
    else:
        vit = timm.create_model(vit_name, pretrained=False).to(device)
        load = load_average()
        load_text = f", load average {load:.1f}" if load is not None else ""
        print(f"4. Inference throughput, batch {args.batch}, median of {args.reps}, {device.type}: "
              f"{device_name(device.type)}{threads}{load_text}:")
        rates = time_inference({args.model: model, vit_name: vit}, args.batch, args.reps, device)
        width = max(map(len, rates))
        for name, rate in rates.items():
            print(f"   {name:<{width}}  {rate:8.1f} images/s")
        # A time ratio, as in the README's tables (above 1: KAT is slower), not the ratio of the rates above.
        print(f"   KAT / ViT time per image: {rates[vit_name] / rates[args.model]:.2f}x (above 1: KAT is slower)")

    if not check.passed:
        failed = ", ".join(name for name, error in check.errors.items() if not error <= check.tolerance)
        print(f"\nFAIL: the '{check.backend}' backend disagrees with the reference ({failed}); see step 1",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
