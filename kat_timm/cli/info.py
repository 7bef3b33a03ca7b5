"""``kat-timm info``: what runs the rational op on this machine, the versions, and the model zoo; quick and offline
(parameters and ``--flops`` counted on the meta device, the Hugging Face cache only looked at; on a GPU the Triton
kernels are compiled and run once on a tiny input, so a (device, dtype) they fail on is shown with the reason)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings
from typing import Any, Dict, List, Optional

from . import CLIError, run_main

__all__ = ["backend_report", "collect", "main"]

# Distributions whose versions matter for the op and the models (importlib.metadata: nothing is imported).
PACKAGES = ("torch", "timm", "triton", "huggingface_hub", "safetensors", "numpy")
CPU_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _describe_backend(backend: str, device: str, triton_mode: str) -> str:
    """One phrase saying what ``backend`` means on ``device``."""
    if backend == "native":
        return "C/OpenMP kernel built on this machine"
    if backend == "triton":
        return "Triton interpreter (TRITON_INTERPRET=1, slow)" if "interpreted" in triton_mode else "Triton kernels"
    return "pure PyTorch (float64 inputs always take it)" if device == "cpu" else "pure PyTorch"


def backend_report() -> Dict[str, Any]:
    """Which implementation of the rational op runs here, per device and dtype, and why; a bad
    ``KAT_RATIONAL_BACKEND`` or a forced backend that cannot run is reported under ``error``, never raised."""
    import torch

    from kat_timm.ops import (BACKEND_ENV, native_cpu_status, rational_cpu, requested_backend, select_backend,
                              triton_fallbacks, triton_status)
    from kat_timm.ops.backend import probe_triton

    native_ok, native_reason = native_cpu_status()
    library = getattr(getattr(rational_cpu, "_library", None), "_name", None) if native_ok else None
    triton_ok, triton_mode = triton_status()
    report: Dict[str, Any] = {
        "env": {BACKEND_ENV: os.environ.get(BACKEND_ENV), "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")},
        "requested": None, "native_cpu": {"available": native_ok, "reason": native_reason, "library": library},
        "triton": {"available": triton_ok, "mode": triton_mode}, "devices": {}, "error": None,
        "triton_fallbacks": {}}
    try:
        report["requested"] = requested_backend()
    except ValueError as error:
        report["error"] = str(error)
        return report

    devices = {"cpu": [getattr(torch, name) for name in CPU_DTYPES]}
    if torch.cuda.is_available():
        devices["cuda"] = [torch.float32, torch.bfloat16, torch.float16]
    errors: Dict[str, List[str]] = {}  # message -> the "device dtype" pairs that hit it
    for device, dtypes in devices.items():
        per_dtype = {}
        for dtype in dtypes:
            name = str(dtype).replace("torch.", "")
            try:
                with warnings.catch_warnings():  # the "native kernel unavailable" warning: reported above instead
                    warnings.simplefilter("ignore")
                    backend = select_backend(torch.empty(0, device=device, dtype=dtype))
                    # On a GPU the kernels are compiled and run once on a tiny input (seconds the first time, then
                    # Triton's cache): a failure shows here, as the op would meet it.
                    failed = backend == "triton" and device == "cuda" and probe_triton(torch.device(device), dtype)
            except RuntimeError as error:
                errors.setdefault(str(error), []).append(f"{device} {name}")
                per_dtype[name] = {"backend": None, "description": f"error: {error}"}
                continue
            if failed:
                per_dtype[name] = {"backend": "torch", "description": "pure PyTorch: the Triton kernels failed (below)"}
                continue
            per_dtype[name] = {"backend": backend, "description": _describe_backend(backend, device, triton_mode)}
        report["devices"][device] = per_dtype
    report["error"] = "; ".join(f"{', '.join(where)}: {message}" for message, where in errors.items()) or None
    report["triton_fallbacks"] = triton_fallbacks()
    return report


def _versions() -> Dict[str, Any]:
    import torch

    import kat_timm
    from kat_timm.benchmark import device_name, package_version

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]  # none without CUDA
    return {"kat_timm": kat_timm.__version__, "python": platform.python_version(),
            **{name: package_version(name) for name in PACKAGES}, "cuda": torch.version.cuda,
            "cpu": device_name("cpu"), "cpu_threads": torch.get_num_threads(), "gpus": gpus}


def collect(flops: bool = False) -> Dict[str, Any]:
    """Everything ``kat-timm info`` reports, as a JSON-ready dict (``versions``, ``backend``, ``hub``, ``models``);
    ``flops``: also each model's forward FLOPs (224 px, batch 1)."""
    from huggingface_hub import constants

    from kat_timm.tools.zoo import cache_state, zoo_rows

    rows = zoo_rows(flops=flops)
    if not rows:
        raise CLIError("no kat* model is registered in timm: the kat_timm install is broken (reinstall it)")
    states = {repo: cache_state(repo) for repo in dict.fromkeys(row.hf_hub_id for row in rows if row.hf_hub_id)}
    # "cache": cached, damaged (checksum mismatch) or not cached; "cached": whether intact weights are there.
    models = [{**row.as_dict(), "cache": states.get(row.hf_hub_id),
               "cached": states[row.hf_hub_id] == "cached" if row.hf_hub_id else None} for row in rows]
    hub = {"cache": str(constants.HF_HUB_CACHE), "offline": bool(constants.is_offline_mode())}
    return {"versions": _versions(), "backend": backend_report(), "hub": hub, "models": models}


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *rows]]


def _text(info: Dict[str, Any], flops: bool) -> str:
    versions, backend, hub = info["versions"], info["backend"], info["hub"]
    lines = [f"kat_timm {versions['kat_timm']} (python {versions['python']})"]
    lines.append("versions: " + ", ".join(f"{name} {versions[name]}" for name in PACKAGES)
                 + f", torch CUDA build {versions['cuda'] or 'none (CPU-only torch)'}")
    gpus = ", ".join(versions["gpus"]) or "none"
    lines.append(f"devices:  CPU {versions['cpu']} ({versions['cpu_threads']} torch threads); GPU: {gpus}")

    env = backend["env"]
    requested = backend["requested"] or "invalid"
    lines += ["", f"rational op backend (KAT_RATIONAL_BACKEND={env['KAT_RATIONAL_BACKEND'] or 'unset'} "
                  f"-> {requested}):"]
    for device, per_dtype in backend["devices"].items():
        # Group dtypes that take the same path, so the usual case is one line.
        groups: Dict[str, List[str]] = {}
        for dtype, choice in per_dtype.items():
            label = f"{choice['backend']}: {choice['description']}" if choice["backend"] else "error (below)"
            groups.setdefault(label, []).append(dtype)
        for label, dtypes in groups.items():
            lines.append(f"  {device:<4} {'/'.join(dtypes):<33} {label}")
    if "cuda" not in backend["devices"]:
        lines.append("  cuda not available")
    native = backend["native_cpu"]
    lines.append(f"  native CPU kernel: {'built' if native['available'] else 'unavailable'}"
                 + (f" ({native['library']})" if native["library"] else f" ({native['reason']})"))
    triton = backend["triton"]
    triton_line = ("importable, " if triton["available"] else "") + triton["mode"]
    if triton["mode"] == "compiled" and "cuda" not in backend["devices"]:
        triton_line += " (runs CUDA tensors; none here)"
    lines.append(f"  triton: {triton_line}")
    for where, reason in backend["triton_fallbacks"].items():
        lines.append(f"  triton failed on {where}, PyTorch runs there instead: {reason} (please report it with this "
                     "output)")
    if backend["error"]:
        lines.append(f"  ERROR: {backend['error']}")

    lines += ["", f"Hugging Face cache: {hub['cache']} (offline mode: {'on' if hub['offline'] else 'off'})", ""]
    header = ["model", "tag", "params", "top-1", "trained", "hub id", "local cache"]
    if flops:
        header[3:3] = ["GMACs", "GFLOPs"]
    rows, aliases = [], {}
    for model in info["models"]:
        if model["alias_of"]:
            aliases.setdefault(model["alias_of"], []).append(model["name"])
            continue
        tag = model["tag"]
        cached = model["cache"] or "-"
        row = [model["model"], tag if tag else ("(default)" if tag == "" else "-"), f"{model['params']:,}",
               f"{model['top1']:.1f}" if model["top1"] is not None else "-", model["training"],
               model["hf_hub_id"] or "-", cached]
        if flops:
            row[3:3] = [f"{model['flops']['macs'] / 1e9:.2f}", f"{model['flops']['total'] / 1e9:.2f}"]
        rows.append(row)
    lines += _table(header, rows)
    if aliases:
        lines += ["", "other names for the same weights:"]
        for target, names in aliases.items():
            lines.append(f"  {target}: {', '.join(names)}")
    if flops:
        lines += ["", "FLOPs: one 224 x 224 image, torch.utils.flop_counter (rational op included). GMACs = FLOPs / 2: "
                     "multiply-adds, what timm's tables and the DeiT paper call FLOPs."]
    lines += ["", 'load: timm.create_model("MODEL[.TAG]", pretrained=True) after "import kat_timm"; '
              "'kat-timm download' fills the cache for offline machines."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None, prog: str = "kat-timm info") -> int:
    """Entry point of ``kat-timm info``."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Show which implementation of the rational op runs on this machine, the versions of "
                               "the packages that matter, and the registered KAT models with parameters, reported "
                               "top-1, Hub id and whether their weights are in the local Hugging Face cache (damaged: "
                               "the cached file does not match its checksum). Offline: nothing is downloaded.")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--flops", action="store_true",
                        help="also count each model's FLOPs for one 224 x 224 image (meta tensors; about a second)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def run() -> int:
        info = collect(flops=args.flops)
        print(json.dumps(info, indent=2) if args.json else _text(info, args.flops))
        return 0

    return run_main(run, prog)


if __name__ == "__main__":
    sys.exit(main())
