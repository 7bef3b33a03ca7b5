#!/usr/bin/env python
"""Benchmark KAT-T/S/B against timm's ViT-T/S/B: images/s for inference and for a training step, and construction time.

ViT and KAT of one size are built with the same batch, input and precision (bf16 autocast on CUDA, fp32 on CPU) and
timed interleaved (ViT, KAT, ViT, ...) so machine noise hits both alike; each sample lasts at least ``min_rep_s``.
The markdown table gives medians and the per-repetition KAT/ViT time ratio; the targets (README, "Benchmarks") are
printed as PASS/FAIL, never asserted. The CPU targets' configuration is ``--device cpu --threads 2``; ``--quick`` is a
smoke run of a few seconds.

``--path`` picks how both models run (inference only, except eager and compile):
- ``eager``: the PyTorch modules (default);
- ``compile``: ``torch.compile`` of both (``--compile`` for short); the first (compiling) call is timed apart, and
  a copy of the KAT runs eagerly too, interleaved, for compiled KAT / eager KAT;
- ``onnxruntime``: ONNX files from ``kat_timm.export_onnx`` run by ONNX Runtime on the CPU with kat_timm's rational
  kernel registered (``kat_timm.onnxruntime_session``); ``onnxruntime-plain``: the same files without it (the
  function bodies, as any runtime without kat_timm runs them);
- ``aoti``: AOTInductor packages from ``kat_timm.aoti_package`` (rationals decomposed, fused by inductor);
- ``openvino``: the ONNX files with the rationals inlined (``export_onnx(..., inline_rationals=True)``: OpenVINO has
  no conversion for the ``kat_timm`` nodes' function bodies) run by OpenVINO's CPU plugin in float32
  (``pip install openvino``).
Export and compile times are reported apart, not in the timings.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import timm
import torch
import torch.nn.functional as F

import kat_timm  # noqa: F401  (registers the kat_* models in timm)
from kat_timm.cli import CLIError
from kat_timm.cli.common import check_whole_patches
from kat_timm.benchmark import (Timer, benchmark_parser, device_name, error_text, load_average, load_text,
                                markdown_table, parse_benchmark_args, run_meta, verdict, version_lines, write_json)
from kat_timm.ops import BACKEND_ENV, select_backend

SIZES = ("tiny", "small", "base")
PATHS = ("eager", "compile", "onnxruntime", "onnxruntime-plain", "aoti", "openvino")
INFERENCE_ONLY = ("onnxruntime", "onnxruntime-plain", "aoti", "openvino")
MODES = ("infer", "train")
FAMILIES = ("vit", "kat")  # measured in this order within every repetition
# --activation-bound: ViT with its MLP activation removed, what an activation that cost nothing would give.
BOUND = "vit_noact"
# --path compile: KAT run eagerly as well (a copy of the same model), interleaved, for compiled KAT / eager KAT.
EAGER_KAT = "kat_eager"
NUM_CLASSES = 1000
LR, WEIGHT_DECAY = 1e-5, 0.05  # small lr: random labels, the weights should barely move during the benchmark

CPU_TARGET = {"threads": 2, "batch": 8, "img_size": 224,
              # (mode, sizes, max KAT/ViT time)
              "limits": (("infer", ("tiny", "small", "base"), 0.95), ("train", ("tiny", "small"), 1.00))}
CONSTRUCTION_TARGET = {"model": "kat_base_patch16_224", "max_s": 5.0}
CUDA_TARGETS = {"train": 0.97, "infer": 0.98}  # KAT throughput >= N x ViT's (the README's GPU targets)
CUDA_TARGET_CONDITIONS = {"device": "H200", "batch": 128, "img_size": 224}
# (cuda, quick) -> warm-up calls and the least seconds per sample (CUDA events on CUDA, else perf_counter)
TIMING = {(True, True): (2, 0.02), (True, False): (5, 0.2), (False, True): (1, 0.0), (False, False): (2, 0.25)}
PRECISION = {"cuda": "bf16 autocast (fp32 weights)", "cpu": "fp32"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = benchmark_parser(
        __doc__, batch_help="batch size (default: 8 on CPU, 128 on CUDA; --quick: 2)",
        reps_help="timed repetitions per model (interleaved), medians reported (default: 7 on CPU, 10 on CUDA; "
                  "--quick: 3)",
        quick_help="smoke run: tiny only, batch 2, one warm-up call, 3 repetitions of one call")
    parser.add_argument("--sizes", nargs="+", choices=SIZES, help="model sizes (default: all of tiny small base; "
                        "--quick: tiny)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="what to measure (default: infer train)")
    parser.add_argument("--img-size", type=int, default=224, help="input resolution in px (default: 224)")
    parser.add_argument("--channels-last", action="store_true",
                        help="channels-last input and models (torch.channels_last)")
    parser.add_argument("--path", choices=PATHS, default="eager",
                        help="how both models run: eager PyTorch (default), torch.compile, ONNX Runtime with "
                             "kat_timm's kernel (onnxruntime) or without (onnxruntime-plain), AOTInductor (aoti), "
                             "OpenVINO (openvino, pip install openvino); the last four are inference only and CPU "
                             "only")
    parser.add_argument("--compile", action="store_true", help="the same as --path compile")
    parser.add_argument("--activation-bound", action="store_true",
                        help="also time ViT with its MLP activation removed (nn.Identity), interleaved with the two: "
                             "the ratio an activation that cost nothing would give (column 'no-act ViT/ViT time')")
    modes_given = argv is not None and "--modes" in argv or argv is None and "--modes" in sys.argv[1:]
    args = parse_benchmark_args(parser, argv)
    if args.compile:
        if args.path not in ("eager", "compile"):
            parser.error(f"--compile is --path compile; it can't be combined with --path {args.path}")
        args.path = "compile"
    args.compile = args.path == "compile"
    if args.path in INFERENCE_ONLY:
        if args.device != "cpu":
            parser.error(f"--path {args.path} runs on the CPU: add --device cpu")
        if modes_given and "train" in args.modes:
            parser.error(f"--path {args.path} is for inference: use --modes infer")
        args.modes = ["infer"]
    if args.path == "openvino" and importlib.util.find_spec("openvino") is None:
        parser.error("--path openvino needs OpenVINO, which is not installed: pip install openvino")
    cuda = args.device == "cuda"
    args.batch = args.batch or (2 if args.quick else (128 if cuda else 8))
    args.sizes = [s for s in SIZES if s in (args.sizes or (["tiny"] if args.quick else SIZES))]  # canonical order
    args.modes = [m for m in MODES if m in args.modes]
    args.reps = args.reps or (3 if args.quick else (10 if cuda else 7))
    if args.img_size < 1:
        parser.error("--img-size must be a positive multiple of the patch size, 16")
    try:
        check_whole_patches((args.img_size, args.img_size), (16, 16), "--img-size")  # the commands' rule
    except CLIError as error:
        parser.error(str(error))
    return args


def autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()  # fp32 CPU


def deployed_forward(model: torch.nn.Module, path: str, images: torch.Tensor, folder: str) -> Callable:
    """``model``'s inference on ``images`` through a deployment path: an ONNX Runtime session of its ONNX file, or
    its AOTInductor package (written into ``folder``)."""
    from kat_timm.tools.export import aoti_package, export_onnx, onnxruntime_session

    model.eval()
    if path == "aoti":
        package = aoti_package(model, os.path.join(folder, "model.pt2"), example_input=images)
        return torch._inductor.aoti_load_package(str(package))
    if path == "openvino":
        openvino = importlib.import_module("openvino")
        onnx_file = export_onnx(model, os.path.join(folder, "model.onnx"), example_input=images, inline_rationals=True)
        compiled = openvino.Core().compile_model(str(onnx_file), "CPU", {
            "INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32"})  # its default on CPUs with bf16 units is bf16
        request = compiled.create_infer_request()
        feed = {0: images.numpy()}
        return lambda _images: request.infer(feed)
    onnx_file = export_onnx(model, os.path.join(folder, "model.onnx"), example_input=images)
    session = onnxruntime_session(onnx_file, threads=torch.get_num_threads(), fast=path == "onnxruntime")
    feed = {session.get_inputs()[0].name: images.numpy()}
    return lambda _images: session.run(None, feed)


def timed_step(model: torch.nn.Module, mode: str, images: torch.Tensor, labels: torch.Tensor, device: str,
               path: str, folder: str) -> Callable[[], None]:
    """The timed unit of one model in one mode: an eval forward, or a full training step."""
    model.train(mode == "train")
    if path in INFERENCE_ONLY:
        run = deployed_forward(model, path, images, folder)
        return lambda: run(images)
    forward = torch.compile(model) if path == "compile" else model
    if mode == "infer":
        def infer() -> None:
            with torch.inference_mode(), autocast(device):
                forward(images)
        return infer
    # foreach / fused left to PyTorch's default for the device: the same for ViT and KAT.
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def train() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            loss = F.cross_entropy(forward(images), labels)
        loss.backward()
        optimizer.step()
    return train


def measure_pair(models: Dict[str, torch.nn.Module], mode: str, args, timer: Timer) -> dict:
    """Interleaved timing of ViT and KAT in one mode; returns the row of the table (milliseconds)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=generator).to(args.device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,), generator=generator).to(args.device)
    families = list(models)
    row: dict = {"mode": mode}
    with tempfile.TemporaryDirectory(prefix="kat-benchmark-") as folder:
        steps, prepare_s = {}, {}
        for family in families:
            started = time.perf_counter()
            os.makedirs(os.path.join(folder, family))
            path = "eager" if family == EAGER_KAT else args.path
            steps[family] = timed_step(models[family], mode, images, labels, args.device, path,
                                       os.path.join(folder, family))
            prepare_s[family] = time.perf_counter() - started
        if args.path in INFERENCE_ONLY:
            row["export_s"] = prepare_s
        if args.compile:
            row["compile_s"] = {f: timer.sample(steps[f], 1, wall=True) for f in families}
        _time_interleaved(row, steps, families, args, timer)
    return row


def _time_interleaved(row: dict, steps: dict, families: List[str], args, timer: Timer) -> None:
    """Time ``steps`` interleaved (ViT, KAT, ViT, ...) and put the medians and ratios into ``row``."""
    calls = {f: timer.calibrate(steps[f]) for f in families}
    samples: Dict[str, List[float]] = {f: [] for f in families}
    for _ in range(args.reps):
        for family in families:  # ViT, KAT, ViT, KAT, ...
            samples[family].append(timer.sample(steps[family], calls[family]))
    ratios = [k / v for v, k in zip(samples["vit"], samples["kat"])]
    if BOUND in samples:
        row["bound_time_ratio"] = statistics.median(b / v for v, b in zip(samples["vit"], samples[BOUND]))
    if EAGER_KAT in samples:
        compiled_over_eager = [k / e for k, e in zip(samples["kat"], samples[EAGER_KAT])]
        row["compiled_over_eager"] = statistics.median(compiled_over_eager)
        row["compiled_over_eager_range"] = [min(compiled_over_eager), max(compiled_over_eager)]
    row.update({
        "calls_per_sample": calls,
        "samples_ms": {f: [s * 1e3 for s in samples[f]] for f in families},
        "median_ms": {f: statistics.median(samples[f]) * 1e3 for f in families},
        "images_per_s": {f: args.batch / statistics.median(samples[f]) for f in families},
        "time_ratios": ratios,
        "time_ratio": statistics.median(ratios),
        "time_ratio_range": [min(ratios), max(ratios)],
        "throughput_ratio": statistics.median([1.0 / r for r in ratios]),
    })


def run_size(size: str, args, timer: Timer, on_row: Optional[Callable[[List[dict], dict], None]] = None) -> tuple:
    """(construction rows, rows): ViT and KAT of one size constructed (timed, on CPU, fresh init) and measured;
    ``on_row(construction rows, row)`` is called as soon as each row is measured."""
    construction, models = [], {}
    for family in FAMILIES + ((BOUND,) if args.activation_bound else ()):
        name = f"{family.split('_')[0]}_{size}_patch16_224"
        print(f"constructing {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        model = timm.create_model(name, pretrained=False, img_size=args.img_size, num_classes=NUM_CLASSES)
        construction.append({"size": size, "family": family, "model": name, "seconds": time.perf_counter() - start,
                             "params_m": sum(p.numel() for p in model.parameters()) / 1e6})
        if family == BOUND:
            for block in model.blocks:
                block.mlp.act = torch.nn.Identity()
        model = model.to(args.device)
        models[family] = model.to(memory_format=torch.channels_last) if args.channels_last else model
    if args.compile:
        models[EAGER_KAT] = copy.deepcopy(models["kat"])
        torch._dynamo.reset()
    rows = []
    for mode in args.modes:
        print(f"measuring {size} {mode} ...", file=sys.stderr, flush=True)
        row = {"size": size}
        try:
            row.update(measure_pair(models, mode, args, timer))
        except Exception as error:  # report and go on: one failing case shouldn't lose the whole run
            row.update(mode=mode, error=error_text(error))
            print(f"warning: {size} {mode} failed: {row['error']}", file=sys.stderr)
        rows.append(row)
        if on_row is not None:
            on_row(construction, row)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    del models
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return construction, rows


def rational_backend(device: str) -> str:
    """The backend kat_timm's rationals take for this run's activations (fp32 on CPU, bf16 under autocast on CUDA)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    try:
        return select_backend(torch.empty(1, 8, device=device, dtype=dtype))
    except Exception as error:  # a forced, unusable backend: the measurement will fail and say so
        return f"unavailable ({type(error).__name__})"


PATH_TEXT = {"eager": "eager", "compile": "torch.compile", "onnxruntime": "ONNX Runtime with kat_timm's kernel",
             "onnxruntime-plain": "ONNX Runtime, function bodies (no kat_timm kernel)", "aoti": "AOTInductor",
             "openvino": "OpenVINO CPU, float32, rationals inlined"}


def threads_text(count: int) -> str:
    return f"{count} thread" + ("" if count == 1 else "s")


def header(args) -> List[str]:
    lines = ["## KAT vs ViT model benchmark", ""]
    repetitions = f"{args.reps} interleaved repetitions (ViT, KAT, ...), medians"
    if args.device == "cuda":
        lines += [f"- device: {device_name('cuda')}", f"- timing: CUDA events + synchronize, {repetitions}"]
    else:
        lines += [f"- device: CPU, {device_name('cpu')}, {threads_text(torch.get_num_threads())}",
                  f"- load average (1 min) at start: {load_text(args.load_at_start)} on {os.cpu_count()} CPUs "
                  "(other busy processes slow multi-threaded runs down a lot; at the end: see below)",
                  f"- timing: time.perf_counter, {repetitions}"]
    return lines + version_lines(args, f"timm {timm.__version__}, kat_timm {kat_timm.__version__}, ") + [
        f"- batch {args.batch}, {args.img_size} px, {PRECISION[args.device]}"
        + (", channels-last" if args.channels_last else "") + f", path: {PATH_TEXT[args.path]}"
        + f"; KAT rationals: {os.environ.get(BACKEND_ENV, 'auto')} -> {rational_backend(args.device)} backend",
        "- infer: eval forward under inference_mode; train: zero_grad + forward + cross-entropy + backward + AdamW "
        "step, train mode; ratio: median over repetitions of KAT time / ViT time (range: min-max)",
        "",
    ]


def table(rows: List[dict], bound: Optional[bool] = None) -> List[str]:
    """The markdown table of ``rows``; ``bound``: whether it has the no-activation column (default: a row has it)."""
    bound = any("bound_time_ratio" in row for row in rows) if bound is None else bound
    cells = []
    for row in rows:
        if "error" in row:
            cells.append([row["size"], row["mode"], f"failed: {row['error'][:80]}"])
            continue
        lo, hi = row["time_ratio_range"]
        ips, ms = row["images_per_s"], row["median_ms"]
        cells.append([row["size"], row["mode"], f"{ips['vit']:.1f}", f"{ips['kat']:.1f}", f"{row['time_ratio']:.3f}",
                      f"{row['throughput_ratio']:.3f}", f"{lo:.2f}-{hi:.2f}", f"{ms['vit']:.1f}", f"{ms['kat']:.1f}"]
                     + ([f"{row.get('bound_time_ratio', float('nan')):.3f}"] if bound else []))
    return markdown_table(["size", "mode", "ViT img/s", "KAT img/s", "KAT/ViT time", "KAT/ViT throughput",
                           "time ratio range", "ViT ms", "KAT ms"] + (["no-act ViT/ViT time"] if bound else []), cells)


def report_lines(construction: List[dict], rows: List[dict]) -> List[str]:
    """The construction line and, under --compile, the compile time of every case."""
    lines = ["- construction (timm.create_model on CPU, fresh init): " + "; ".join(
        f"{c['model']}{' (no activation)' if c['family'] == BOUND else ''} {c['seconds']:.2f} s "
        f"({c['params_m']:.1f} M params)" for c in construction)] \
        if construction else []
    return lines + [f"- torch.compile, first call of {row['size']} {row['mode']}: ViT {row['compile_s']['vit']:.1f} s, "
                    f"KAT {row['compile_s']['kat']:.1f} s; not in the timings" for row in rows if "compile_s" in row] \
        + [f"- export of {row['size']}: ViT {row['export_s']['vit']:.1f} s, KAT {row['export_s']['kat']:.1f} s; not in "
           f"the timings" for row in rows if "export_s" in row] \
        + [f"- compiled KAT / eager KAT time, {row['size']} {row['mode']} (interleaved with the two): "
           f"{row['compiled_over_eager']:.3f} ({row['compiled_over_eager_range'][0]:.2f}-"
           f"{row['compiled_over_eager_range'][1]:.2f})" for row in rows if "compiled_over_eager" in row]


def differs_note(conditions: List[tuple], target: str) -> str:
    """`` [measured with ...; the target is for ...]`` when this run's conditions are not the target's."""
    differs = [text for same, text in conditions if not same]
    return f" [measured with {', '.join(differs)}; the target is for {target}]" if differs else ""


def target_lines(args, rows: List[dict], construction: List[dict]) -> List[str]:
    """The issue's targets as PASS/FAIL lines (reported, never asserted)."""
    ok = {(r["size"], r["mode"]): r for r in rows if "error" not in r}
    lines = []
    if args.device == "cpu":
        t, threads = CPU_TARGET, torch.get_num_threads()
        note = differs_note([(threads == t["threads"], threads_text(threads)),
                             (args.batch == t["batch"], f"batch {args.batch}"),
                             (args.img_size == t["img_size"], f"{args.img_size} px"),
                             (not args.channels_last, "channels-last"),
                             (args.path == "eager", PATH_TEXT[args.path])],
                            f"{t['threads']} threads, batch {t['batch']}, {t['img_size']} px, eager")
        for mode, sizes, limit in t["limits"]:
            what = "inference" if mode == "infer" else "training step"
            for size in sizes:
                row = ok.get((size, mode))
                lines.append(f"- CPU target, {size} {what}: not evaluated (needs --sizes {size} --modes {mode})"
                             if row is None else
                             f"- CPU target, {size} {what}: KAT/ViT time {row['time_ratio']:.3f} (target <= "
                             f"{limit:.2f}): {verdict(row['time_ratio'] <= limit)}{note}")
    else:
        c, gpu = CUDA_TARGET_CONDITIONS, device_name("cuda")
        note = differs_note([(c["device"] in gpu, gpu), (args.batch == c["batch"], f"batch {args.batch}"),
                             (args.img_size == c["img_size"], f"{args.img_size} px")],
                            f"an {c['device']}, batch {c['batch']}, {c['img_size']} px, bf16 autocast")
        for size in args.sizes:
            for mode, target in CUDA_TARGETS.items():
                if (size, mode) in ok:
                    ratio = ok[(size, mode)]["throughput_ratio"]
                    lines.append(f"- CUDA target, {size} {'training' if mode == 'train' else 'inference'}: KAT "
                                 f"throughput {ratio:.3f}x ViT's (target >= {target:.2f}x): "
                                 f"{verdict(ratio >= target)}{note}")
    seconds = {c["model"]: c["seconds"] for c in construction}
    name, limit = CONSTRUCTION_TARGET["model"], CONSTRUCTION_TARGET["max_s"]
    return lines + [f"- construction target, {name}: not evaluated (needs --sizes base)" if name not in seconds else
                    f"- construction target, {name} on CPU ({threads_text(torch.get_num_threads())}): "
                    f"{seconds[name]:.2f} s (target < {limit:g} s): {verdict(seconds[name] < limit)}"]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compile:
        # Room for every (model, mode) graph: ViT and KAT share VisionTransformer's code objects, and a full cache
        # would silently fall back to eager. The option was renamed (cache_size_limit -> recompile_limit).
        for option in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, option):
                setattr(torch._dynamo.config, option, max(64, getattr(torch._dynamo.config, option)))
    warmup, min_rep_s = TIMING[(args.device == "cuda", args.quick)]
    # A compiled model's first call compiles; a couple more settle autotuning and caches.
    timer = Timer(args.device, warmup + (2 if args.compile else 0), min_rep_s)
    meta = run_meta(args, timm=timm.__version__, kat_timm=kat_timm.__version__, img_size=args.img_size,
                    precision=PRECISION[args.device], channels_last=args.channels_last, compile=args.compile,
                    path=args.path, sizes=args.sizes, modes=args.modes, rational_backend=rational_backend(args.device))
    # The header and each row are printed, and the JSON rewritten, as soon as they are known: a run cut off by a time
    # limit (scripts/gpu_check.sh) keeps every case it finished.
    print("\n".join(header(args) + table([], args.activation_bound)), flush=True)
    started = time.perf_counter()
    construction, rows = [], []

    def on_row(built: List[dict], row: dict) -> None:
        rows.append(row)
        write_json(args.json, meta=meta, construction=construction + built, results=rows, complete=False)
        print("\n".join(table([row], args.activation_bound)[2:]), flush=True)  # (after the JSON holds it)

    for size in args.sizes:
        built, _ = run_size(size, args, timer, on_row)
        construction += built
    elapsed = time.perf_counter() - started
    args.load_at_end = load_average()
    targets = target_lines(args, rows, construction)
    print("\n".join([""] + report_lines(construction, rows) + targets
                     + [f"- load average (1 min) at end: {load_text(args.load_at_end)}"] * (args.device == "cpu")
                     + [f"- measured in {elapsed:.0f} s"]))
    meta.update(load_at_end=args.load_at_end, elapsed_s=elapsed)
    write_json(args.json, meta=meta, construction=construction, results=rows, targets=targets, complete=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
