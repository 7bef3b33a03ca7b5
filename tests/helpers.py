"""Shared test helpers: random coefficients, comparison against the float64 reference, and test models and files."""
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import torch

from kat_timm.ops import group_rational, group_rational_reference


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """torch's intra-op thread count set to ``n`` inside the block and restored afterwards, even on an error.

    What the ``single_thread`` fixture (tests/conftest.py) runs a test under; fixtures of module or session scope,
    which can't request a test's fixture, and tests that compare thread counts use it directly.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def one_thread_env(**overrides: str) -> dict:
    """The environment for a child process that runs on one OpenMP thread, as the tests themselves do."""
    return dict(os.environ, OMP_NUM_THREADS="1", **overrides)


def compile_and_capture(fn, *args, mode=torch.inference_mode):
    """``fn(*args)`` through ``torch.compile(fullgraph=True)`` under ``mode`` (no gradient), with a backend that records
    the graphs dynamo hands it; returns (the result, the targets of every node of those graphs, as strings)."""
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    with mode():
        result = torch.compile(fn, backend=capture, fullgraph=True)(*args)
    return result, [str(node.target) for graph in graphs for node in graph.graph.nodes]


def random_coefficients(groups: int, shared_numerator: bool = True, dtype=torch.float32, scale: float = 0.5):
    numerator = (torch.randn(1 if shared_numerator else groups, 6, dtype=dtype) * scale).requires_grad_()
    denominator = (torch.randn(groups, 4, dtype=dtype) * scale).requires_grad_()
    return numerator, denominator


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(max |expected|, 1e-12), in float64."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def check_against_reference(x, numerator, denominator, channel_dim=-1, rtol=1e-5, op=group_rational, bias=None):
    """Run forward and backward of ``op`` and assert value and all gradients (three, or four with a ``bias``, which
    is passed as ``op(..., bias=bias)``) against the reference."""
    x = x.detach().requires_grad_()
    numerator = numerator.detach().requires_grad_()
    denominator = denominator.detach().requires_grad_()
    if bias is None:
        y = op(x, numerator, denominator, channel_dim)
    else:
        bias = bias.detach().requires_grad_()
        y = op(x, numerator, denominator, channel_dim, bias=bias)
    grad = torch.randn_like(y)
    y.backward(grad)
    ref = group_rational_reference(x, numerator, denominator, channel_dim, grad, bias=bias)
    ref_y, ref_dx, ref_dnum, ref_dden = ref[:4]
    assert y.shape == x.shape and y.dtype == x.dtype, "output must have x's shape and dtype"
    assert relative_error(y, ref_y) <= rtol, f"value: rel err {relative_error(y, ref_y):.3e}"
    assert relative_error(x.grad, ref_dx) <= rtol, f"grad x: rel err {relative_error(x.grad, ref_dx):.3e}"
    assert numerator.grad.shape == numerator.shape and denominator.grad.shape == denominator.shape
    assert relative_error(numerator.grad, ref_dnum) <= rtol, (
        f"grad numerator: rel err {relative_error(numerator.grad, ref_dnum):.3e}"
    )
    assert relative_error(denominator.grad, ref_dden) <= rtol, (
        f"grad denominator: rel err {relative_error(denominator.grad, ref_dden):.3e}"
    )
    if bias is not None:
        assert bias.grad is not None and bias.grad.shape == bias.shape and bias.grad.dtype == bias.dtype, "grad bias"
        assert relative_error(bias.grad, ref[4]) <= rtol, f"grad bias: rel err {relative_error(bias.grad, ref[4]):.3e}"
    return y


def assert_backward_deterministic(x, numerator, denominator, channel_dim=-1, runs=2):
    """Run forward + backward ``runs`` times with one upstream gradient; all gradients must agree bitwise."""
    x = x.detach().requires_grad_()
    numerator = numerator.detach().requires_grad_()
    denominator = denominator.detach().requires_grad_()
    grad = torch.randn_like(x)
    results = []
    for _ in range(runs):
        for t in (x, numerator, denominator):
            t.grad = None
        group_rational(x, numerator, denominator, channel_dim).backward(grad)
        results.append([t.grad.clone() for t in (x, numerator, denominator)])
    for other in results[1:]:
        for name, first, again in zip(("x", "numerator", "denominator"), results[0], other):
            assert torch.equal(first, again), f"grad {name} differs between identical backward calls"


def magnitudes(dtype):
    """Inputs of every magnitude the dtype holds: +-10^k, both sides of the form switch (1e3), a few randoms."""
    top = {torch.float16: 4, torch.bfloat16: 38, torch.float32: 38, torch.float64: 300}[dtype]
    powers = torch.tensor([10.0**k for k in range(-6, top + 1)] + [999.0, 1000.0, 1001.0], dtype=torch.float64)
    values = torch.cat([powers, -powers, torch.randn(16, dtype=torch.float64) * 3])
    return values.to(dtype)


def assert_matches_rounded_reference(actual, reference, rtol, what):
    """Where the exact value rounds to a finite number of actual's dtype it must be finite and close; where it
    overflows the dtype it must be the infinity of its sign (overflow is the right answer, NaN never is)."""
    rounded = reference.to(actual.dtype)
    finite = torch.isfinite(rounded)
    assert not torch.isnan(actual).any(), f"{what}: NaN for a finite input"
    assert torch.isfinite(actual[finite]).all(), f"{what}: inf where the exact value is finite"
    assert torch.equal(actual[~finite], rounded[~finite]), f"{what}: overflow to the wrong infinity"
    # Element-wise relative error, with subnormal outputs (below the dtype's smallest normal) held to absolute error.
    floor = torch.finfo(actual.dtype).smallest_normal
    err = ((actual[finite].double() - reference[finite]).abs() / reference[finite].abs().clamp_min(floor)).max()
    assert err <= rtol, f"{what}: relative error {err:.2e} element-wise"


def trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Jitter every rational's coefficients so that its groups differ, as after training."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "weight_numerator" in name or "weight_denominator" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def fill_uninitialised_(model: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """Give the tensors timm's ViT creates with ``torch.empty`` (cls/reg token, position embedding) small random
    values. ``weight_init="skip"`` leaves them as whatever bits the allocator returned, NaN included, which is fine
    before loading a checkpoint but not for a model whose own weights a test saves or runs."""
    with torch.no_grad():
        for name in ("cls_token", "reg_token", "pos_embed"):
            tensor = getattr(model, name, None)
            if isinstance(tensor, torch.Tensor):
                tensor.normal_(0.0, std)
    return model


def save_vit_as_npz(vit, path):
    """Write a timm ViT in the layout of Google's (AugReg) .npz checkpoints, which timm's _load_weights reads."""
    import numpy as np

    d, heads = vit.embed_dim, vit.blocks[0].attn.num_heads
    n = lambda t: t.detach().numpy()  # noqa: E731
    w = {
        "embedding/kernel": n(vit.patch_embed.proj.weight.permute(2, 3, 1, 0)),
        "embedding/bias": n(vit.patch_embed.proj.bias),
        "cls": n(vit.cls_token),
        "Transformer/posembed_input/pos_embedding": n(vit.pos_embed),
        "Transformer/encoder_norm/scale": n(vit.norm.weight),
        "Transformer/encoder_norm/bias": n(vit.norm.bias),
        "head/kernel": n(vit.head.weight.T),
        "head/bias": n(vit.head.bias),
    }
    for i, block in enumerate(vit.blocks):
        p = f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = n(block.norm1.weight), n(block.norm1.bias)
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = n(block.norm2.weight), n(block.norm2.bias)
        qkv = zip(("query", "key", "value"), block.attn.qkv.weight.split(d), block.attn.qkv.bias.split(d))
        for name, weight, bias in qkv:
            w[mha + f"{name}/kernel"] = n(weight.T.reshape(d, heads, d // heads))
            w[mha + f"{name}/bias"] = n(bias.reshape(heads, d // heads))
        w[mha + "out/kernel"] = n(block.attn.proj.weight.reshape(d, heads, d // heads).permute(1, 2, 0))
        w[mha + "out/bias"] = n(block.attn.proj.bias)
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"], w[p + f"MlpBlock_3/Dense_{r}/bias"] = n(fc.weight.T), n(fc.bias)
    np.savez(path, **w)


def sigkill_training_after_first_checkpoint(args, cwd, run_dir, log_path, timeout_s: float) -> None:
    """Run ``python -m kat_timm.cli.train *args`` in a process of its own (log in ``log_path``), wait for its first
    checkpoint in ``run_dir`` and a step of the next epoch, and SIGKILL it in the middle of that epoch."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = one_thread_env(PYTHONUNBUFFERED="1", PYTHONPATH=str(repo))
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "kat_timm.cli.train", *map(str, args)], stdout=log,
                                   stderr=subprocess.STDOUT, cwd=cwd, env=env)
    try:
        deadline = time.monotonic() + timeout_s
        while "Train: 1/" not in log_path.read_text() or not (run_dir / "last.pth.tar").exists():
            assert process.poll() is None, f"kat-train ended early:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no checkpoint after {timeout_s} s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL, "kat-train finished before it could be killed"


# A process that holds the lock of a run folder as kat-train does, until its stdin closes.
_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def lock_held_by_another_process(folder: Path):
    """The run folder ``folder`` locked by a child process, as a kat-train run locks it (``flock`` of its run.lock,
    which records the pid), until the block ends; yields the child's pid."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder / "run.lock")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        yield holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
