"""Deployment exports of a KAT (README, "ONNX"): ``torch.export`` programs and ONNX files of standard ops."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

from ..files import output_target
from ..ops.rational_torch import LARGE_INPUT
from ..transforms import model_input_size

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "MissingDependencyError", "OpsetConversionError", "check_export_target",
           "check_onnx",
           "decompose_rationals", "export_onnx", "export_program", "group_rational_plain", "model_input_size",
           "onnx_io_shapes", "onnx_op_domains", "require_packages", "standard_domains_only"]

DEFAULT_OPSET = 18  # what PyTorch's exporter (torchlib) writes natively; others go through onnx's version converter
MIN_OPSET = 17  # LayerNormalization, which every ViT block uses, is an ONNX op from opset 17 on
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# Above this many bytes of weights (protobuf's limit is 2 GiB) they go to a side file; every KAT is far below.
_EXTERNAL_DATA_BYTES = 1 << 30
_STANDARD_DOMAINS = ("", "ai.onnx")

PathLike = Union[str, Path]


class MissingDependencyError(ImportError):
    """An optional package that ONNX export or its check needs is not installed."""


class OpsetConversionError(RuntimeError):
    """PyTorch's ONNX exporter could not write the graph in the requested opset."""


def require_packages(*names: str, purpose: str = "ONNX export"):
    """The first of ``names`` imported; :class:`MissingDependencyError` naming every one that is missing."""
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(f"{purpose} needs {' and '.join(missing)} (not installed); pip install onnx "
                                     'onnxscript onnxruntime (or, in a kat_timm checkout, pip install -e ".[onnx]")')
    return importlib.import_module(names[0])


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    training = model.training
    try:
        yield model.eval()
    finally:
        model.train(training)


def group_rational_plain(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, channel_dim: int = -1,
                         bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``kat_timm.ops.group_rational`` with elementary ops only (Horner steps, Abs, Div, Where), what an exported
    graph computes; for inference and export (train with ``group_rational``: its gradient of |b| at b == 0 is +1)."""
    groups = denominator.shape[0]
    cdim = channel_dim % x.dim()
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xc = x.to(compute)
    if bias is not None:
        # (C,) -> (C, 1, ..., 1): one value per channel, broadcast over the axes after the channel axis.
        xc = xc + bias.to(compute).reshape((x.shape[cdim],) + (1,) * (x.dim() - 1 - cdim))
    # Each group's channels, and everything after the channel axis, form one contiguous run of the last axis.
    xg = xc.reshape(tuple(x.shape[:cdim]) + (groups, -1))
    numerator, denominator = numerator.to(compute).expand(groups, 6), denominator.to(compute).abs()
    a = [numerator[:, i : i + 1] for i in range(6)]  # a0..a5, each (G, 1)
    b = [denominator[:, j : j + 1] for j in range(4)]  # |b1|..|b4|
    ax = xg.abs()
    # Large |x|: the reciprocal form x * P~(1/x) / Q~(1/|x|) (kat_timm.ops.rational_torch), so that a large input
    # gives the finite value it should instead of inf or NaN; Where and Reciprocal are standard ONNX ops too.
    large = ax > LARGE_INPUT
    u = 1.0 / torch.where(large, xg, torch.full_like(xg, 2.0))
    au = u.abs()
    q_recip = _horner(au, au + b[0], b[1:])
    use = large & torch.isfinite(1.0 / q_recip)  # Q~ underflows only when the top b's are 0: the plain form is exact
    plain = _horner(xg, a[5], a[4::-1]) / _horner(ax, b[3], [*b[2::-1], 1.0])
    return torch.where(use, xg * _horner(u, a[0], a[1:]) / q_recip, plain).reshape(x.shape).to(x.dtype)


def _horner(t: torch.Tensor, leading, coefficients):
    """``leading * t^n + c_1 * t^(n-1) + ... + c_n`` for ``coefficients`` c_1..c_n, as Mul and Add steps."""
    for coefficient in coefficients:
        leading = leading * t + coefficient
    return leading


def _example_input(model: torch.nn.Module, batch_size: int) -> torch.Tensor:
    parameter = next(model.parameters())
    return torch.randn((batch_size,) + model_input_size(model), dtype=parameter.dtype, device=parameter.device)


def export_program(model: torch.nn.Module, example_input: Optional[torch.Tensor] = None,
                   dynamic_batch: bool = False) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` in eval mode, traced with ``example_input`` (default: 2 random images),
    optionally with a symbolic batch; the rationals stay ``kat_timm::group_rational`` nodes (README, "ONNX")."""
    if example_input is None:
        example_input = _example_input(model, batch_size=2)
    dynamic_shapes = None
    if dynamic_batch:
        if example_input.shape[0] < 2:
            # torch.export specialises a dimension of size 1, so trace with two images.
            example_input = example_input.expand(2, *example_input.shape[1:]).contiguous()
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},)
    with _eval_mode(model):
        return torch.export.export(model, (example_input,), dynamic_shapes=dynamic_shapes)


def decompose_rationals(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` with every ``kat_timm::group_rational`` node replaced by ``group_rational_plain``'s ops (only that
    op: the exporter's own decompositions keep what ONNX has natively, LayerNormalization, Gemm...)."""
    return program.run_decompositions({torch.ops.kat_timm.group_rational.default: group_rational_plain})


def check_export_target(path: PathLike, opset: int) -> None:
    """ValueError for an opset a KAT can't be written in (or the installed onnx does not know), FileNotFoundError
    for a missing output folder."""
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: a KAT needs opset {MIN_OPSET} or newer (LayerNormalization)")
    newest = importlib.import_module("onnx").defs.onnx_opset_version() if importlib.util.find_spec("onnx") else opset
    if opset > newest:
        raise ValueError(f"opset {opset} is newer than the installed onnx knows ({newest}); the default is "
                         f"{DEFAULT_OPSET}")
    folder = Path(path).parent
    if not folder.is_dir():
        raise FileNotFoundError(f"output folder {folder} does not exist; create it first (mkdir -p {folder})")


def export_onnx(model: torch.nn.Module, path: PathLike, dynamic_batch: bool = False, opset: int = DEFAULT_OPSET,
                batch_size: int = 1, example_input: Optional[torch.Tensor] = None) -> Path:
    """Export ``model`` (in eval mode) to an ONNX file of standard ops, input ``images``, output ``logits``, checked
    with ``onnx.checker`` and only then put at ``path`` (README, "ONNX"); ``batch_size``: the graph's fixed batch
    (with ``dynamic_batch``, the tracing batch). A symbolic link at ``path`` is written through; a folder, device or
    FIFO there raises :class:`kat_timm.files.OutputPathError`."""
    onnx = require_packages("onnx", "onnxscript")
    check_export_target(path, opset)
    path = Path(path)
    target = Path(output_target(path))  # a link's target; a device, FIFO or folder refused (a rename replaces them)
    if example_input is None:
        example_input = _example_input(model, batch_size)
    program = decompose_rationals(export_program(model, example_input, dynamic_batch))
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    external_data = weight_bytes > _EXTERNAL_DATA_BYTES
    # Written under a temporary name and renamed once checked, so a failed export leaves no file (and an existing
    # one untouched). Weights in a side file name it after the .onnx file, which a rename would break: those
    # exports (above 1 GiB, no KAT) are written in place.
    partial = target if external_data else target.with_name(f".{target.name}.{os.getpid()}.partial.onnx")
    # onnxscript logs a failed opset conversion with a traceback; the check below reports it in one line instead.
    converter_log = logging.getLogger("onnxscript.version_converter")
    log_level = converter_log.level
    converter_log.setLevel(logging.ERROR)
    try:
        # The program already has the symbolic batch; dynamic_shapes only names it "batch" in the file (not "s77").
        torch.onnx.export(program, (example_input,), str(partial), input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=opset, dynamo=True,
                          dynamic_shapes=({0: "batch"},) if dynamic_batch else None, external_data=external_data,
                          verbose=False)
        written = next(entry.version for entry in onnx.load(str(partial), load_external_data=False).opset_import
                       if entry.domain in _STANDARD_DOMAINS)
        if written != opset:
            # The exporter keeps its own opset when the version converter fails, with only a log message.
            raise OpsetConversionError(f"the ONNX exporter could not convert the graph to opset {opset} (it wrote "
                                       f"opset {written}); use opset {DEFAULT_OPSET}")
        onnx.checker.check_model(str(partial), full_check=True)
        if partial != target:
            os.replace(partial, target)
    finally:
        converter_log.setLevel(log_level)
        if partial != target:
            partial.unlink(missing_ok=True)
    return path


def onnx_io_shapes(path: PathLike) -> Dict[str, List[Union[int, str]]]:
    """{input or output name: shape} of an ONNX file; a symbolic dimension is its name (a string)."""
    graph = require_packages("onnx").load(str(path), load_external_data=False).graph
    return {value.name: [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]
            for value in list(graph.input) + list(graph.output)}


def onnx_op_domains(path: PathLike) -> Dict[str, set]:
    """{domain: set of op types} of the nodes of an ONNX file's main graph ("" is the standard ONNX domain)."""
    domains: Dict[str, set] = {}
    for node in require_packages("onnx").load(str(path), load_external_data=False).graph.node:
        domains.setdefault(node.domain, set()).add(node.op_type)
    return domains


def check_onnx(path: PathLike, model: torch.nn.Module, batch_sizes: Sequence[int] = (2,),
               seed: int = 0) -> Dict[int, float]:
    """{batch size: ||onnx - torch|| / ||torch||} of the ONNX file run by onnxruntime (CPU) and ``model`` on the
    same random images."""
    onnxruntime = require_packages("onnxruntime", purpose="checking an ONNX file")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    errors = {}
    with _eval_mode(model):
        for batch_size in batch_sizes:
            images = torch.randn((batch_size,) + model_input_size(model), generator=generator)
            with torch.inference_mode():
                expected = model(images.to(parameter.device, parameter.dtype)).float().cpu()
            actual = torch.from_numpy(session.run(None, {input_name: images.numpy()})[0])
            errors[batch_size] = ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()
    return errors


def standard_domains_only(domains: Dict[str, set]) -> bool:
    """True when every op of ``onnx_op_domains`` output is in the standard ONNX domain."""
    return all(domain in _STANDARD_DOMAINS for domain in domains)
