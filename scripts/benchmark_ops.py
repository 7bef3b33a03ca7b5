#!/usr/bin/env python
"""Benchmark ``kat_timm.ops.group_rational`` against GELU and against the plain PyTorch formula.

Providers (``--providers``): gelu, ours (the auto-selected backend), bias (ours with a (C,) input bias), fallback
(forced pure PyTorch), formula (plain differentiable ops) and compiled (that formula through ``torch.compile``,
compile time reported apart); modes fwd (no grad), bwd (a DENSE upstream gradient: ``y.sum().backward()`` would hand
the kernels a stride-0 one) and fwd+bwd, on the KAT-T/S/B activation shapes. Bandwidth counts only an elementwise
op's unavoidable traffic (5 passes over the tensor for fwd+bwd). ``--overhead`` times the host cost of one call on
a (2, 64) tensor instead. Targets are printed as PASS/FAIL, never asserted. Commands and results: README,
"Benchmarks"; ``--quick`` is a smoke run of a few seconds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from unittest import mock
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from kat_timm.benchmark import (Timer, benchmark_parser, device_name, error_text, load_text, markdown_table,
                                parse_benchmark_args, run_meta, verdict, version_lines, write_json)
from kat_timm.ops import BACKEND_ENV, group_rational, group_rational_autograd, select_backend

TOKENS = 197  # 14 x 14 patches + the class token, at 224 px
GROUPS = 8
WIDTHS = {192: "T d", 384: "S d", 768: "T 4d, B d", 1536: "S 4d", 3072: "B 4d"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROVIDERS = ("gelu", "ours", "bias", "fallback", "formula", "compiled")
MODES = ("fwd", "bwd", "fwd+bwd")
BYTES_MOVED = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}  # x numel * element size, per mode (see the docstring)
CPU_TARGET_SHAPE, CPU_TARGETS = (8, TOKENS, 3072), {"fwd": 3.0, "fwd+bwd": 4.0}  # ours <= N x GELU
BIAS_TARGETS = {"fwd": 1.05, "fwd+bwd": 1.05}  # ours with a bias <= N x ours without, same shape
CUDA_TARGETS = {"fwd": 90.0, "bwd": 85.0}  # ours >= N % of copy bandwidth (the README's GPU targets)


def parse_args(argv=None) -> argparse.Namespace:
    parser = benchmark_parser(
        __doc__, batch_help="batch size (default: 8 on CPU, 128 on CUDA; --quick: 1 on CPU, 8 on CUDA)",
        reps_help="CPU: timed repetitions per measurement, median reported (default 7, --quick 3)",
        quick_help="smoke run: small batch, few repetitions, no torch.compile")
    parser.add_argument("--shapes", type=int, nargs="+", metavar="C", default=sorted(WIDTHS),
                        help=f"channel widths C of the (batch, {TOKENS}, C) shapes (default: {sorted(WIDTHS)})")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["float32"],
                        help="dtypes to measure (default: float32)")
    parser.add_argument("--overhead", action="store_true",
                        help="measure the host time per call on a tiny tensor instead (see the docstring)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=None,
                        help=f"what to measure (default: all of {', '.join(PROVIDERS)}; --quick drops compiled)")
    args = parse_benchmark_args(parser, argv)
    if any(c <= 0 or c % GROUPS for c in args.shapes):
        parser.error(f"--shapes: every width must be a positive multiple of {GROUPS}")
    cuda = args.device == "cuda"
    args.batch = args.batch or ((8 if cuda else 1) if args.quick else (128 if cuda else 8))
    args.providers = args.providers or [p for p in PROVIDERS if not (args.quick and p == "compiled")]
    args.reps = args.reps or (3 if args.quick else 7)
    return args


def make_timer(device: str, quick: bool, reps: int) -> Callable[[Callable[[], object]], float]:
    """A function that times a no-argument callable and returns milliseconds per call (median)."""
    if device == "cuda":
        from triton.testing import do_bench  # imported lazily: slow, and absent on some CPU-only machines

        warmup, rep = (5, 20) if quick else (25, 100)
        return lambda fn: do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    timer = Timer("cpu", *((1, 0.002) if quick else (2, 0.05)))
    return lambda fn: timer.median(fn, reps) * 1e3


def copy_bandwidth_gbps(bench) -> float:
    """The device's copy bandwidth: 2 * bytes / time of a 512 MiB ``Tensor.copy_``."""
    src = torch.empty(2 ** 27, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    gbps = 2 * src.numel() * src.element_size() / ms / 1e6
    src = dst = None  # free the 1 GiB before the benchmarks (None, not del: the lambda above names them)
    torch.cuda.empty_cache()
    return gbps


def backend_env(value: Optional[str]):
    """Set ``KAT_RATIONAL_BACKEND`` for the duration of the block (None: leave it as it is)."""
    return mock.patch.dict(os.environ, {} if value is None else {BACKEND_ENV: value})


def build_provider(name: str, x, numerator, denominator, g, bias) -> dict:
    """The callable y = fn(x) of one provider, its gradient inputs, its label, and (compiled) its compile time."""
    rational = (numerator, denominator)
    if name == "gelu":
        return {"label": "gelu", "fn": F.gelu, "params": ()}
    if name == "formula":
        return {"label": "formula (eager)", "params": rational,
                "fn": lambda t: group_rational_autograd(t, numerator, denominator)}
    if name != "compiled":  # ours, bias, and fallback (ours with the backend forced by the environment)
        with_bias = bias if name == "bias" else None
        return {"label": f"ours{'' if with_bias is None else '+bias'} ({select_backend(x)})",
                "params": rational + (() if with_bias is None else (bias,)),
                "fn": lambda t: group_rational(t, numerator, denominator, bias=with_bias)}
    # compiled: compile from scratch for this shape and dtype, outside the timed region; the first no-grad call
    # compiles the inference graph, the first grad call + backward the training graphs. Donated buffers (backward
    # reusing saved tensors' memory) are turned off for the whole process (the flag is also read when the backward
    # runs): they forbid the retain_graph=True of the bwd measurement. No other provider uses torch.compile.
    torch._functorch.config.donated_buffer = False
    torch._dynamo.reset()
    compiled = torch.compile(group_rational_autograd, dynamic=False)
    from torch._inductor.utils import fresh_inductor_cache  # private; torch 2.1+, an alias of the newer fresh_cache

    timer = Timer(x.device.type)
    with fresh_inductor_cache():  # an empty inductor (and Triton) cache: the compile time reported is a first one
        with torch.no_grad():
            inference_s = timer.sample(lambda: compiled(x, numerator, denominator), 1, wall=True)
        training_s = timer.sample(lambda: torch.autograd.grad(compiled(x, numerator, denominator), (x,) + rational, g),
                                  1, wall=True)
    return {"label": "formula (compiled)", "params": rational,
            "fn": lambda t: compiled(t, numerator, denominator),
            "compile_s": {"inference": inference_s, "training": training_s}}


def measure(provider: dict, x, g, bench) -> Dict[str, float]:
    """Milliseconds of the three modes of one provider (see the module docstring)."""
    fn, inputs = provider["fn"], (x,) + provider["params"]
    with torch.no_grad():
        fwd = bench(lambda: fn(x))
    y = fn(x)
    bwd = bench(lambda: torch.autograd.grad(y, inputs, g, retain_graph=True))
    y = None  # drop the graph before timing fwd+bwd (None, not del: the lambda above names y)
    fwd_bwd = bench(lambda: torch.autograd.grad(fn(x), inputs, g))
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def run_case(shape, dtype, providers, device, bench) -> List[dict]:
    """Measure every provider on one shape and dtype; a provider that fails is recorded with its error."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype).requires_grad_()
    numerator = (0.3 * torch.randn(1, 6, generator=generator)).to(device).requires_grad_()
    denominator = (0.3 * torch.randn(GROUPS, 4, generator=generator)).to(device).requires_grad_()
    bias = (0.1 * torch.randn(shape[-1], generator=generator)).to(device).requires_grad_()
    g = torch.randn_like(x)
    rows = []
    for name in providers:
        row = {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "provider": name}
        try:
            with backend_env("torch" if name == "fallback" else None):
                provider = build_provider(name, x, numerator, denominator, g, bias)
                row["label"] = provider["label"]
                row["ms"] = measure(provider, x, g, bench)
            if "compile_s" in provider:
                row["compile_s"] = provider["compile_s"]
            bytes_per_pass = x.numel() * x.element_size()
            row["gbps"] = {m: BYTES_MOVED[m] * bytes_per_pass / row["ms"][m] / 1e6 for m in MODES}
        except Exception as error:  # report and go on: one broken provider shouldn't lose the whole run
            row.setdefault("label", name)
            row["error"] = error_text(error)
            print(f"warning: {name} failed on {shape} {dtype}: {row['error']}", file=sys.stderr)
        rows.append(row)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def header(args, copy_gbps: Optional[float]) -> List[str]:
    lines = ["## group_rational benchmark", ""]
    if args.device == "cuda":
        lines += [f"- device: {device_name('cuda')} (copy bandwidth {copy_gbps:.0f} GB/s)",
                  "- timing: triton.testing.do_bench, median"]
    else:
        lines += [f"- device: CPU, {device_name('cpu')}, {torch.get_num_threads()} threads",
                  f"- load average (1 min) at start: {load_text(args.load_at_start)} on {os.cpu_count()} CPUs "
                  "(other busy processes slow multi-threaded runs down a lot)",
                  f"- timing: time.perf_counter, median of {args.reps} repetitions"]
    return lines + version_lines(args) + [
        f"- shapes: ({args.batch}, {TOKENS}, C), {GROUPS} groups; C = "
        + ", ".join(f"{c} ({WIDTHS.get(c, 'custom')})" for c in args.shapes),
        "- fwd: forward under no_grad; bwd: backward alone (dense upstream gradient, grads of x and the "
        "coefficients); fwd+bwd: both; x GELU: time / GELU time of the same mode; "
        "GB/s: (2, 3, 5) x numel x bytes / time",
        "",
    ]


def table_columns(cuda: bool) -> List[str]:
    columns = ["shape", "dtype", "provider", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd x GELU", "fwd+bwd x GELU",
               "fwd+bwd GB/s"]
    return columns + (["fwd % copy", "bwd % copy"] if cuda else [])


def table_rows(rows: List[dict], cuda: bool, copy_gbps: Optional[float]) -> List[str]:
    """The markdown rows of measured cases (one case's rows hold its GELU row, the ratios' base)."""
    gelu = {(tuple(r["shape"]), r["dtype"]): r["ms"] for r in rows if r["provider"] == "gelu" and "ms" in r}
    lines = []
    for row in rows:
        cells = ["x".join(map(str, row["shape"])), row["dtype"], row["label"]]
        if "error" in row:
            cells.append(f"failed: {row['error'][:60]}")
        else:
            ms, ref = row["ms"], gelu.get((tuple(row["shape"]), row["dtype"]))
            cells += [f"{ms[m]:.3f}" for m in MODES]
            cells += [f"{ms[m] / ref[m]:.2f}" if ref else "-" for m in ("fwd", "fwd+bwd")]
            cells.append(f"{row['gbps']['fwd+bwd']:.1f}")
            if cuda:
                cells += [f"{100 * row['gbps'][m] / copy_gbps:.0f}%" for m in ("fwd", "bwd")]
        lines.append(cells)
    return markdown_table(table_columns(cuda), lines)[2:]


def target_lines(rows: List[dict], cuda: bool, copy_gbps: Optional[float]) -> List[str]:
    """The issue's targets as PASS/FAIL lines (reported, never asserted)."""
    ok = [r for r in rows if "ms" in r]
    if cuda:
        return [f"- CUDA target, {r['label']} {'x'.join(map(str, r['shape']))} {r['dtype']}: " + "; ".join(
            f"{mode} {100 * r['gbps'][mode] / copy_gbps:.0f}% of copy bandwidth (target >= {target:.0f}%): "
            f"{verdict(100 * r['gbps'][mode] / copy_gbps >= target)}" for mode, target in CUDA_TARGETS.items())
            for r in ok if r["provider"] == "ours"]
    pick = {r["provider"]: r for r in ok if tuple(r["shape"]) == CPU_TARGET_SHAPE and r["dtype"] == "float32"}
    if "ours" not in pick or "gelu" not in pick:
        return [f"- CPU targets: not evaluated (they need ours and gelu on {CPU_TARGET_SHAPE} float32)"]

    def ratios(row: dict, base: dict, targets: Dict[str, float], digits: int, versus: str) -> str:
        return "; ".join(f"{mode} {row['ms'][mode] / base['ms'][mode]:.{digits}f}x {versus} (target <= {target:g}x): "
                         f"{verdict(row['ms'][mode] / base['ms'][mode] <= target)}" for mode, target in targets.items())

    shape = "x".join(map(str, CPU_TARGET_SHAPE))
    lines = [f"- CPU targets, {pick['ours']['label']} {shape} float32: "
             + ratios(pick["ours"], pick["gelu"], CPU_TARGETS, 2, "GELU")]
    if "bias" in pick:
        lines.append(f"- CPU targets, {pick['bias']['label']} {shape} float32, vs no bias: "
                     + ratios(pick["bias"], pick["ours"], BIAS_TARGETS, 3, "without"))
    return lines


OVERHEAD_SHAPE = (2, 64)
OVERHEAD_TARGET = 1.5  # CPU native: <= N x GELU's host time


def overhead_rows(device: str, rounds: int, calls: int) -> List[dict]:
    """Host microseconds per call of GELU and of group_rational per backend, forward and forward+backward."""
    x = torch.randn(OVERHEAD_SHAPE, device=device)
    xg = x.clone().requires_grad_()
    numerator = (torch.randn(1, 6, device=device) * 0.5).requires_grad_()
    denominator = (torch.randn(GROUPS, 4, device=device) * 0.5).requires_grad_()
    g = torch.randn_like(x)

    def modes(fn: Callable, params: tuple) -> Dict[str, Callable[[], object]]:
        """fn(x, *params) under no_grad, and with the backward to x and params (fn called directly: no wrapper's
        call is timed)."""
        def fwd():
            with torch.no_grad():
                fn(x, *params)
        return {"fwd": fwd, "fwd+bwd": lambda: torch.autograd.grad(fn(xg, *params), (xg, *params), g)}

    # (backend set around the timed batch, not per call, so the environment lookup isn't counted twice)
    providers = {"gelu": (None, modes(F.gelu, ()))}
    providers.update({f"ours ({b})": (b, modes(group_rational, (numerator, denominator)))
                      for b in (("triton", "torch") if device == "cuda" else ("native", "torch"))})
    samples = {(name, mode): [] for name in providers for mode in ("fwd", "fwd+bwd")}
    timer = Timer(device, warmup=3)
    for backend, fns in providers.values():  # warm up: builds, imports, first-call caches
        with backend_env(backend):
            for fn in fns.values():
                timer.calibrate(fn)
    for _ in range(rounds):
        for name, (backend, fns) in providers.items():
            with backend_env(backend):
                for mode, fn in fns.items():
                    samples[(name, mode)].append(timer.sample(fn, calls, wall=True) * 1e6)
    return [{"provider": name, "us": {mode: min(samples[(name, mode)]) for mode in ("fwd", "fwd+bwd")}}
            for name in providers]


def overhead_lines(rows: List[dict], args, rounds: int) -> List[str]:
    gelu, device = rows[0]["us"], args.device
    where = device_name(device) + ("" if device == "cuda" else f", {torch.get_num_threads()} threads")
    lines = ["## group_rational host overhead", "", f"- device: {where}", *version_lines(args), "",
             f"Host time per call, shape {OVERHEAD_SHAPE} float32 ({device}), minimum over {rounds} interleaved rounds:", ""]
    lines += markdown_table(["provider", "fwd us", "fwd+bwd us", "fwd / GELU", "fwd+bwd / GELU"], [
        [r["provider"], f"{r['us']['fwd']:.1f}", f"{r['us']['fwd+bwd']:.1f}", f"{r['us']['fwd'] / gelu['fwd']:.2f}x",
         f"{r['us']['fwd+bwd'] / gelu['fwd+bwd']:.2f}x"] for r in rows]) + [""]
    if device == "cpu":  # rows: gelu, ours (native), ours (torch)
        ratios = {mode: rows[1]["us"][mode] / gelu[mode] for mode in ("fwd", "fwd+bwd")}
        lines.append("- CPU host-overhead target, native backend: " + "; ".join(
            f"{mode} {ratio:.2f}x GELU (target <= {OVERHEAD_TARGET}x): {verdict(ratio <= OVERHEAD_TARGET)}"
            for mode, ratio in ratios.items()))
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.overhead:
        rounds, calls = (3, 50) if args.quick else (max(args.reps, 7), 300)
        rows = overhead_rows(args.device, rounds, calls)
        print("\n".join(overhead_lines(rows, args, rounds)))
        write_json(args.json, meta=run_meta(args), overhead=rows)
        return 0
    bench = make_timer(args.device, args.quick, args.reps)
    copy_gbps = copy_bandwidth_gbps(bench) if args.device == "cuda" else None

    cuda = args.device == "cuda"
    # The header and each case's rows are printed, and the JSON rewritten, as soon as they are known: a run cut off
    # by a time limit (scripts/gpu_check.sh) keeps every case it finished.
    print("\n".join(header(args, copy_gbps) + markdown_table(table_columns(cuda), [])), flush=True)
    started = time.perf_counter()
    rows = []
    for width in args.shapes:
        for dtype_name in args.dtype:
            shape = (args.batch, TOKENS, width)
            print(f"measuring {shape} {dtype_name} ...", file=sys.stderr, flush=True)
            case = run_case(shape, DTYPES[dtype_name], args.providers, args.device, bench)
            rows += case
            write_json(args.json, meta=run_meta(args, copy_gbps=copy_gbps), results=rows, complete=False)
            print("\n".join(table_rows(case, cuda, copy_gbps)), flush=True)  # (after the JSON holds it)
    elapsed = time.perf_counter() - started

    lines = [""]
    lines += [f"- torch.compile time, {'x'.join(map(str, row['shape']))} {row['dtype']}: {sum(c.values()):.1f} s "
              f"(inference graph {c['inference']:.1f} s, training graphs {c['training']:.1f} s), empty inductor cache; "
              "not in the timings" for row in rows if (c := row.get("compile_s"))]
    lines += target_lines(rows, cuda, copy_gbps)
    lines.append(f"- measured in {elapsed:.0f} s")
    print("\n".join(lines))

    write_json(args.json, meta=run_meta(args, copy_gbps=copy_gbps, elapsed_s=elapsed), results=rows, complete=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
