#!/usr/bin/env python
"""One short call that measures kat_timm on a lent GPU within a time budget; scripts/README.md, "GPU, measured".

The steps run most important first, each only while its estimated time still fits in the budget (``--budget``,
seconds, counted from the start); a step that no longer fits is reported "not run", and a step that runs is cut off
at what is left of the budget:

  0. timm's version, checked first: KAT needs pyproject.toml's floor; an older timm skips the model steps and the
     summary says exactly which wheel to carry;
  1. preamble: the card, its SM count and memory, driver and CUDA, python/torch/triton/timm/numpy versions, git
     commit, date; the measured device-to-device copy bandwidth; one forward+backward of the op (fp32 and bf16)
     against the float64 reference;
  2. the op in bf16 at the KAT-T/S/B shapes, batch 128: forward, backward, GB/s and % of the copy bandwidth, vs GELU;
  3. KAT vs ViT T/S/B, eager training steps, batch 128, bf16 autocast: img/s and KAT/ViT;
  4. ``pytest -m cuda`` (``-n 4`` where pytest-xdist imports), failed tests listed by name;
  5. the op in fp32; KAT vs ViT eager inference; the host overhead per call;
  6. compiled models, one (size, mode) per step, tiny first and training first, while time is left.

The benchmarks print each case's row and rewrite their JSON as soon as it is measured, and summary.md and
results.json are rewritten after every step, so a cut-off keeps everything measured so far. OUTDIR receives at most
six files: summary.md (the table check | case | measured | target | verdict, naming the card), results.json, ops.md,
models.md, pytest_cuda.txt and log.txt. The static kernel report is not run here (it is a compile: CI runs it).
``--dry-run`` runs the same steps on the CPU at tiny sizes (what CI tests); its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
DEFAULT_BUDGET_S = 270
WHEEL_DIR = ".whl"  # the folder a device call carries (scripts/README.md, "GPU, measured"); ignored by git
FILES = ("summary.md", "results.json", "ops.md", "models.md", "pytest_cuda.txt", "log.txt")
OP_CHECK_SHAPE = (8, 197, 768)
# Relative error (||out - ref|| / ||ref||) allowed against the float64 reference, as tests/ops/test_cuda.py allows.
OP_CHECK_TOLERANCE = {"float32": {"y": 1e-6, "dx": 1e-5, "coefficients": 1e-4},
                      "bfloat16": {"y": 1e-2, "dx": 3e-2, "coefficients": 1e-4}}
TARGET_WIDTH = 3072  # KAT-B's act2: the shape the op's bandwidth targets are for
COMPILED_CASES = [(size, mode) for size in ("tiny", "small", "base") for mode in ("train", "infer")]


def timm_floor() -> str:
    """The lowest timm kat_timm supports: pyproject.toml's ``timm>=`` (one place to change it)."""
    match = re.search(r'"timm>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return match.group(1) if match else "0"


def version_tuple(text: str) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def carry_instructions(floor: str) -> str:
    """What to carry to a device whose timm is missing or older than ``floor`` (the device tool's README, Notes)."""
    return (f"carry timm {floor}: here, run `scripts/device_wheels.sh` (downloads the wheel into {WHEEL_DIR}/), then "
            f"call the device with carry [\"{WHEEL_DIR}\"] and a command that starts with `python3 -m pip install -q "
            f"--no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site {WHEEL_DIR}/*.whl && "
            "export PYTHONPATH=/tmp/site || exit;`")


class Run:
    """The state of one gpu_check run: the summary's rows, every step's results, and the files in OUTDIR."""

    def __init__(self, out: Path, budget: float, dry_run: bool):
        self.out, self.budget, self.dry_run, self.started = out, budget, dry_run, time.monotonic()
        self.meta: Dict[str, object] = {}
        self.rows: List[List[str]] = []
        self.steps: List[dict] = []
        self.results: Dict[str, object] = {}
        self.notes: List[str] = []
        self.copy_gbps: Optional[float] = None  # the preamble's measurement, the base of every "% of copy"
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))  # the benchmarks' own JSON, merged in results
        for name in FILES:
            (out / name).unlink(missing_ok=True)

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def log(self, text: str) -> None:
        with open(self.out / "log.txt", "a", encoding="utf-8") as handle:
            handle.write(text.rstrip("\n") + "\n")

    def row(self, check: str, case: str, measured: str, target: str, verdict: str) -> None:
        self.rows.append([check, case, measured, target, verdict])

    def summary_lines(self) -> List[str]:
        m = self.meta
        kind = "DRY RUN on the CPU (tiny sizes; the numbers mean nothing)" if self.dry_run else "GPU run"
        lines = [f"# gpu_check: {m.get('card', 'unknown card')} ({kind})", "",
                 f"- date: {m.get('date')}; git commit: {m.get('commit')}",
                 f"- card: {m.get('card')}, {m.get('sm_count', '?')} SMs, {m.get('memory_gib', '?')} GiB; "
                 f"driver {m.get('driver', '?')}, CUDA {m.get('cuda', '?')}",
                 f"- python {m.get('python')}, torch {m.get('torch')}, triton {m.get('triton')}, timm {m.get('timm')}, "
                 f"numpy {m.get('numpy')}",
                 "- copy bandwidth (device to device, bytes read + written): "
                 + (f"{m['copy_gbps']} GB/s" if "copy_gbps" in m else "not measured"),
                 f"- budget {self.budget:.0f} s; used {time.monotonic() - self.started:.0f} s", ""]
        lines += [f"- **{note}**" for note in self.notes] + ([""] if self.notes else [])
        lines += ["| check | case | measured | target | verdict |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        lines += ["", "Steps (seconds of wall time):", ""]
        lines += [f"- {s['name']}: {s['status']}" + (f" ({s['seconds']:.0f} s)" if "seconds" in s else "")
                  for s in self.steps]
        return lines

    def save(self) -> None:
        """Rewrite summary.md and results.json (each replaced in one step: never half written)."""
        payload = {"meta": self.meta, "steps": self.steps, "summary": self.rows, "results": self.results}
        for name, text in (("summary.md", "\n".join(self.summary_lines()) + "\n"),
                           ("results.json", json.dumps(payload, indent=1, default=str))):
            partial = self.scratch / name
            partial.write_text(text, encoding="utf-8")
            shutil.move(str(partial), str(self.out / name))


def run_command(run: Run, command: List[str], stdout_file: str, timeout: float) -> tuple:
    """Run ``command`` with stdout appended to OUTDIR/stdout_file and stderr to log.txt; (exit code or "timed out",
    seconds). Its whole process group is ended at the timeout (torch.compile's worker processes too)."""
    run.log(f"$ {' '.join(command)}  (limit {timeout:.0f} s)")
    started = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(run.out / stdout_file, "a", encoding="utf-8") as out, open(run.out / "log.txt", "a") as err:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=err, env=env, start_new_session=True)
        try:
            code = process.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = "timed out"
    return code, time.monotonic() - started


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---- step 1: the preamble, in this process ----

def preamble(run: Run, device: str) -> None:
    import numpy
    import torch

    m = run.meta
    m["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    m["commit"] = git_commit()
    m.update(python=platform.python_version(), torch=torch.__version__, numpy=numpy.__version__,
             triton=module_version("triton"), timm=module_version("timm"), cuda=torch.version.cuda)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        m.update(card=props.name, sm_count=props.multi_processor_count,
                 memory_gib=round(props.total_memory / 2 ** 30, 1), driver=nvidia_driver())
    else:
        from kat_timm.benchmark import device_name

        m.update(card=f"CPU: {device_name('cpu')}", sm_count="no", memory_gib="-", driver="-")
    run.save()
    run.copy_gbps = copy_bandwidth(device)
    m["copy_gbps"] = round(run.copy_gbps, 1)
    run.row("copy bandwidth", "device-to-device copy, bytes read + written", f"{run.copy_gbps:.1f} GB/s", "-",
            "measured")
    for dtype_name, tolerance in OP_CHECK_TOLERANCE.items():
        try:
            errors = op_check(device, getattr(torch, dtype_name))
            passed = all(errors[name]["relative"] <= tolerance[key] for name, key in
                         (("y", "y"), ("dx", "dx"), ("d numerator", "coefficients"), ("d denominator", "coefficients")))
            worst = max(errors, key=lambda name: errors[name]["relative"])
            measured = (f"largest relative error {errors[worst]['relative']:.1e} ({worst}); max abs error "
                        + ", ".join(f"{name} {e['max_abs']:.1e}" for name, e in errors.items()))
            run.results[f"op_check_{dtype_name}"] = errors
        except Exception as error:  # noqa: BLE001 - a broken op is a result to report, not a crash
            passed, measured = False, f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
        target = ", ".join(f"{key} <= {value:g}" for key, value in tolerance.items())
        run.row("op vs float64 reference", f"{dtype_name} {OP_CHECK_SHAPE} forward+backward", measured,
                f"relative error {target}", "PASS" if passed else "FAIL")


def module_version(name: str) -> str:
    try:
        return __import__(name).__version__
    except Exception as error:  # noqa: BLE001 - reported, not fatal
        return f"not importable ({type(error).__name__})"


def git_commit() -> str:
    """HEAD (with "+ local changes" when the tree differs), or $KAT_GIT_COMMIT where the copy has no .git (the device
    machine receives the working tree without it)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return head.stdout.strip() + (" + local changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("KAT_GIT_COMMIT") or "unknown (no git here: set KAT_GIT_COMMIT in the call)"


def nvidia_driver() -> str:
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20)
        return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else "?"
    except (OSError, subprocess.SubprocessError):
        return "? (no nvidia-smi)"


def copy_bandwidth(device: str) -> float:
    """GB/s of a large ``Tensor.copy_`` counting bytes read and written (benchmark_ops.py's own on CUDA)."""
    import torch

    if device == "cuda":
        sys.path.insert(0, str(SCRIPTS))
        from benchmark_ops import copy_bandwidth_gbps, make_timer

        return copy_bandwidth_gbps(make_timer("cuda", False, 1))
    from kat_timm.benchmark import Timer

    src = torch.randn(2 ** 22)
    dst = torch.empty_like(src)
    seconds = Timer("cpu", warmup=1).median(lambda: dst.copy_(src), 3)
    return 2 * src.numel() * src.element_size() / seconds / 1e9


def op_check(device: str, dtype) -> Dict[str, Dict[str, float]]:
    """One forward+backward of group_rational on ``device`` against the float64 reference: errors per output."""
    import torch
    from kat_timm.ops import group_rational, group_rational_reference

    generator = torch.Generator().manual_seed(0)
    x = (2 * torch.randn(OP_CHECK_SHAPE, generator=generator)).to(device=device, dtype=dtype).requires_grad_()
    numerator = (0.3 * torch.randn(1, 6, generator=generator)).to(device).requires_grad_()
    denominator = (0.3 * torch.randn(8, 4, generator=generator)).to(device).requires_grad_()
    grad = torch.randn(OP_CHECK_SHAPE, generator=generator).to(device=device, dtype=dtype)
    y = group_rational(x, numerator, denominator)
    y.backward(grad)
    references = group_rational_reference(x.detach(), numerator.detach(), denominator.detach(), -1, grad)
    outputs = {"y": y, "dx": x.grad, "d numerator": numerator.grad, "d denominator": denominator.grad}
    errors = {}
    for (name, out), ref in zip(outputs.items(), references):
        diff = out.double() - ref.to(out.device)
        errors[name] = {"relative": float(diff.norm() / ref.norm()), "max_abs": float(diff.abs().max())}
    return errors


# ---- steps 2-6: the benchmark scripts, each in its own process ----

def benchmark_step(run: Run, key: str, script: str, arguments: List[str], stdout_file: str,
                   summarize: Callable[[Run, dict], None], expected: int, timeout: float) -> str:
    """Run one benchmark script with its JSON in the scratch folder, merge what it wrote (even cut off), summarize."""
    json_path = run.scratch / f"{key}.json"
    code, seconds = run_command(run, [sys.executable, str(SCRIPTS / script), *arguments, "--json", str(json_path)],
                                stdout_file, timeout)
    data = read_json(json_path) or {}
    run.results[key] = data
    rows = data.get("results") or data.get("overhead") or []
    if rows:
        try:
            summarize(run, data)
        except Exception as error:  # noqa: BLE001 - the raw results are in results.json; say why the rows are not
            run.row(key, "-", f"summary failed: {type(error).__name__}: {error}", "-", "see results.json")
    missing = expected - len(rows)
    status = "ok" if code == 0 else (f"timed out after {seconds:.0f} s" if code == "timed out" else f"exit code {code}")
    if missing > 0:
        run.row(key, f"{missing} of {expected} cases", "-", "-",
                f"not run ({status}; see {stdout_file} and log.txt)" if code != 0 else "FAIL (missing from the JSON)")
    return status


def ops_summary(label: str) -> Callable[[Run, dict], None]:
    def summarize(run: Run, data: dict) -> None:
        from benchmark_ops import CUDA_TARGETS

        copy = run.copy_gbps or data["meta"].get("copy_gbps")
        rows = data["results"]
        gelu = {(tuple(r["shape"]), r["dtype"]): r["ms"] for r in rows if r["provider"] == "gelu" and "ms" in r}
        for r in rows:
            if r["provider"] != "ours":
                continue
            case = f"{label} {'x'.join(map(str, r['shape']))} {r['dtype']}"
            if "error" in r:
                run.row(f"op {r['dtype']}", case, f"failed: {r['error'][:100]}", "-", "FAIL")
                continue
            ref = gelu.get((tuple(r["shape"]), r["dtype"]))
            for mode in ("fwd", "bwd"):
                share = 100 * r["gbps"][mode] / copy if copy else float("nan")
                versus = f", {r['ms'][mode] / ref[mode]:.2f}x GELU's time" if ref else ""
                measured = f"{r['gbps'][mode]:.0f} GB/s = {share:.0f}% of copy; {r['ms'][mode]:.3f} ms{versus}"
                graded = r["dtype"] == "bfloat16" and r["shape"][-1] == TARGET_WIDTH
                target = f">= {CUDA_TARGETS[mode]:.0f}% of copy" if graded else "(none at this shape)"
                verdict = ("PASS" if share >= CUDA_TARGETS[mode] else "FAIL") if graded else "measured"
                run.row(f"op {r['dtype']} {mode}", case, measured, target, verdict)
    return summarize


def models_summary(label: str, graded: bool) -> Callable[[Run, dict], None]:
    def summarize(run: Run, data: dict) -> None:
        from benchmark_models import CUDA_TARGETS

        for r in data["results"]:
            case = f"{r['size']} {r['mode']}, batch {data['meta']['batch']}, {data['meta']['precision']}"
            if "error" in r:
                run.row(label, case, f"failed: {r['error'][:100]}", "-", "FAIL")
                continue
            ips = r["images_per_s"]
            measured = (f"KAT {ips['kat']:.0f} img/s, ViT {ips['vit']:.0f} img/s: KAT/ViT throughput "
                        f"{r['throughput_ratio']:.3f}")
            if "compile_s" in r:
                measured += f" (compile ViT {r['compile_s']['vit']:.0f} s, KAT {r['compile_s']['kat']:.0f} s)"
            target = CUDA_TARGETS[r["mode"]]
            run.row(label, case, measured, f">= {target:.2f}" if graded else "(none)",
                    ("PASS" if r["throughput_ratio"] >= target else "FAIL") if graded else "measured")
    return summarize


def overhead_summary(run: Run, data: dict) -> None:
    gelu = data["overhead"][0]["us"]
    for r in data["overhead"]:
        run.row("host overhead per call", f"{r['provider']}, (2, 64) float32",
                f"fwd {r['us']['fwd']:.1f} us ({r['us']['fwd'] / gelu['fwd']:.2f}x GELU), fwd+bwd "
                f"{r['us']['fwd+bwd']:.1f} us ({r['us']['fwd+bwd'] / gelu['fwd+bwd']:.2f}x)", "(none)", "measured")


def pytest_step(run: Run, dry_run: bool, timeout: float) -> str:
    """``pytest -m cuda`` (all of tests/ on the GPU; the dry run collects tests/ops/test_cuda.py alone, to stay short),
    failed tests listed by name."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-rfEs"]
    try:
        import xdist  # noqa: F401  (only whether it imports matters)

        command += ["-n", "4"]
    except ImportError:
        pass
    command.append("tests/ops/test_cuda.py" if dry_run else "tests")
    code, seconds = run_command(run, command, "pytest_cuda.txt", timeout)
    text = (run.out / "pytest_cuda.txt").read_text(encoding="utf-8", errors="replace")
    failed = [line.split()[1].split(" - ")[0] for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    counts = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text.splitlines()[-1] if text else "")
    tally = ", ".join(f"{n} {what}" for n, what in counts) or "no result line"
    run.results["pytest_cuda"] = {"exit_code": code, "failed": failed, "tally": tally}
    if code == "timed out":
        verdict = f"not run to the end (timed out after {seconds:.0f} s)"
    else:
        verdict = "PASS" if code in (0, 5) and not failed else "FAIL"
    run.row("pytest -m cuda", "tests/" if not dry_run else "tests/ops/test_cuda.py",
            tally + ("; failed: " + ", ".join(failed) if failed else ""), "all pass", verdict)
    return "ok" if code == 0 else str(code)


def plan(dry_run: bool, timm_ok: bool) -> List[dict]:
    """The steps after the preamble: name, estimated seconds (skipped when more than what is left), upper limit,
    and what runs. Estimates on an H100/H200 are derived in scripts/README.md ("GPU, measured"); the dry run's are this
    CPU's."""
    if dry_run:
        common = ["--device", "cpu", "--threads", "1", "--quick"]
        ops = common + ["--batch", "1", "--shapes", "192", "--providers", "gelu", "ours"]
        models = common + ["--batch", "2", "--img-size", "32", "--sizes", "tiny"]
        sizes = ["tiny"]
        # name: (estimate, limit) in seconds; a CPU compile of even the tiny models takes minutes: reported not run.
        times = {"ops_bf16": (10, 60), "models_train": (15, 90), "pytest": (20, 120), "ops_fp32": (10, 60),
                 "models_infer": (15, 90), "overhead": (10, 60), "compiled": (600, 900)}
    else:
        common = ["--device", "cuda", "--batch", "128"]
        ops = common + ["--providers", "gelu", "ours"]
        models = common + ["--reps", "5"]
        sizes = ["tiny", "small", "base"]
        times = {"ops_bf16": (30, 60), "models_train": (35, 90), "pytest": (40, 120), "ops_fp32": (25, 60),
                 "models_infer": (30, 90), "overhead": (10, 40), "compiled": (90, 150)}
    widths = 1 if dry_run else 5
    no_timm = None if timm_ok else "timm too old or missing (see the note above)"
    steps = [
        dict(name="op bf16, KAT-T/S/B shapes", key="ops_bf16", time=times["ops_bf16"], run=lambda r, t: benchmark_step(
            r, "ops_bf16", "benchmark_ops.py", ops + ["--dtype", "bfloat16"], "ops.md", ops_summary("op"), widths, t)),
        dict(name="models, eager, training", key="models_train", time=times["models_train"], skip=no_timm,
             run=lambda r, t: benchmark_step(r, "models_train", "benchmark_models.py", models + ["--modes", "train"],
                                             "models.md", models_summary("models eager", True), len(sizes), t)),
        dict(name="pytest -m cuda", key="pytest", time=times["pytest"], run=lambda r, t: pytest_step(r, dry_run, t)),
        dict(name="op fp32, KAT-T/S/B shapes", key="ops_fp32", time=times["ops_fp32"], run=lambda r, t: benchmark_step(
            r, "ops_fp32", "benchmark_ops.py", ops + ["--dtype", "float32"], "ops.md", ops_summary("op"), widths, t)),
        dict(name="models, eager, inference", key="models_infer", time=times["models_infer"], skip=no_timm,
             run=lambda r, t: benchmark_step(r, "models_infer", "benchmark_models.py", models + ["--modes", "infer"],
                                             "models.md", models_summary("models eager", True), len(sizes), t)),
        dict(name="host overhead per call", key="overhead", time=times["overhead"], run=lambda r, t: benchmark_step(
            r, "overhead", "benchmark_ops.py", common[:4] + ["--overhead"] + (["--quick"] if dry_run else []),
            "ops.md", overhead_summary, 1, t)),
    ]
    for size, mode in COMPILED_CASES:
        if size not in sizes:
            continue
        key = f"compiled_{size}_{mode}"
        steps.append(dict(name=f"models, torch.compile, {size} {mode}", key=key, time=times["compiled"],
                          skip=no_timm, run=lambda r, t, key=key, size=size, mode=mode: benchmark_step(
                              r, key, "benchmark_models.py", models + ["--compile", "--sizes", size, "--modes", mode],
                              "models.md", models_summary("models compiled", False), 1, t)))
    return steps


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split(
                                         "\n\n", 1)[1])
    parser.add_argument("outdir", metavar="OUTDIR", help="folder for the (at most six) result files; created")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same steps on the CPU at tiny sizes (CI's check that the call still works)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, metavar="SECONDS",
                        help=f"wall time for the whole check, preamble included (default: {DEFAULT_BUDGET_S}); a step "
                             "whose estimate no longer fits is reported 'not run'")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error("--budget must be a positive number of seconds")
    if Path(args.outdir).exists() and not Path(args.outdir).is_dir():
        parser.error(f"OUTDIR {args.outdir} is a file, not a folder")
    return args


def fail(message: str) -> int:
    print(f"gpu_check: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    try:  # checked before OUTDIR is made: nothing can run without torch
        import torch
    except Exception as error:  # noqa: BLE001 - ImportError, or a broken install's own error
        return fail(f"{sys.executable} can't import torch ({type(error).__name__}: {str(error).splitlines()[0]}); "
                    "run it with the python that has torch, triton, timm and pytest (PYTHON=/path/to/python3)")
    if not args.dry_run and not torch.cuda.is_available():
        return fail(f"no CUDA device visible to {sys.executable} (use --dry-run for the CPU smoke run)")
    out = Path(args.outdir).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return fail(f"can't create {args.outdir} ({error.strerror})")
    device = "cpu" if args.dry_run else "cuda"
    run = Run(out, args.budget, args.dry_run)
    sys.path.insert(0, str(SCRIPTS))

    floor, timm_version = timm_floor(), module_version("timm")
    timm_ok = version_tuple(timm_version) >= version_tuple(floor) if timm_version[0].isdigit() else False
    run.row("timm version", "KAT needs timm >= " + floor, timm_version, f">= {floor}", "PASS" if timm_ok else "FAIL")
    if not timm_ok:
        run.notes.append(f"timm {timm_version} here: the model steps are not run. Next time, "
                         + carry_instructions(floor))
        print(f"gpu_check: timm {timm_version} is older than {floor}: {carry_instructions(floor)}", file=sys.stderr)

    step_started = time.monotonic()
    try:
        preamble(run, device)
        run.steps.append({"name": "preamble", "status": "ok", "seconds": time.monotonic() - step_started})
    except Exception as error:  # noqa: BLE001 - reported in the summary; the benchmarks may still run
        run.steps.append({"name": "preamble", "status": f"failed: {type(error).__name__}: {error}",
                          "seconds": time.monotonic() - step_started})
    run.save()
    print("\n".join(run.summary_lines()[:6]), flush=True)

    for step in plan(args.dry_run, timm_ok):
        estimate, limit = step["time"]
        left = run.left()
        if step.get("skip"):
            status = f"not run: {step['skip']}"
        elif estimate > left:
            status = f"not run: needs ~{estimate} s, {max(left, 0):.0f} s of the budget left"
        else:
            print(f"gpu_check: {step['name']} (up to {min(limit, left):.0f} s) ...", flush=True)
            step_started = time.monotonic()
            status = step["run"](run, min(limit, left))
            run.steps.append({"name": step["name"], "status": status, "seconds": time.monotonic() - step_started})
            run.save()
            continue
        run.row(step["name"], "-", "-", "-", status)
        run.steps.append({"name": step["name"], "status": status})
        run.save()
    shutil.rmtree(run.scratch, ignore_errors=True)
    print("\n".join(run.summary_lines()), flush=True)
    return 0 if all(s["status"] == "ok" or s["status"].startswith("not run") for s in run.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
