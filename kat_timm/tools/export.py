"""Deployment exports of a KAT (README, "Deployment"): ``torch.export`` programs, AOTInductor packages and ONNX files.

In an ONNX file each rational is one ``kat_timm::GroupRational`` node (``GroupRationalBias`` with fc1's bias folded
in) whose ONNX function body, shipped in the file, computes it with standard ops: ONNX Runtime (and any runtime that
inlines local functions) runs the file, and ONNX Runtime with kat_timm's kernel registered (``onnxruntime_session``)
runs each node in one native pass instead. ``inline_rationals=True`` writes the bodies inlined: standard ops only, no
function (for OpenVINO, which has no conversion for the nodes).
"""
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
from ..ops.rational_torch import LARGE_INPUT, group_rational_plain
from ..transforms import model_input_size

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "RATIONAL_DOMAIN", "MissingDependencyError", "OpsetConversionError",
           "aoti_package", "check_export_target", "check_onnx", "decompose_rationals", "export_onnx", "export_program",
           "group_rational_plain", "model_input_size", "onnx_io_shapes", "onnx_op_domains", "onnxruntime_session",
           "rational_functions", "require_packages", "standard_domains_only"]

DEFAULT_OPSET = 18  # what PyTorch's exporter (torchlib) writes natively; others go through onnx's version converter
MIN_OPSET = 17  # LayerNormalization, which every ViT block uses, is an ONNX op from opset 17 on
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# Above this many bytes of weights (protobuf's limit is 2 GiB) they go to a side file; every KAT is far below.
_EXTERNAL_DATA_BYTES = 1 << 30
_STANDARD_DOMAINS = ("", "ai.onnx")
RATIONAL_DOMAIN = "kat_timm"  # the ONNX domain of the rational nodes (and of their function bodies)
_RATIONAL_OPS = {False: "GroupRational", True: "GroupRationalBias"}  # by "has a bias input"

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


def aoti_package(model: torch.nn.Module, path: PathLike, example_input: Optional[torch.Tensor] = None,
                 dynamic_batch: bool = False) -> Path:
    """An AOTInductor package of ``model`` (eval mode) at ``path`` (``.pt2``), for
    ``torch._inductor.aoti_load_package``: the rationals are decomposed into pointwise ops first
    (``decompose_rationals``), which inductor fuses with what surrounds them, so the package runs without kat_timm
    and on any device inductor compiles for (the example input's)."""
    import torch._inductor

    program = decompose_rationals(export_program(model, example_input, dynamic_batch))
    return Path(torch._inductor.aoti_compile_and_package(program, package_path=str(path)))


def _rational_body(opset: int, bias: bool, branch_free: bool):
    """The FunctionProto of ``kat_timm::GroupRational(x, numerator, denominator)`` (``GroupRationalBias`` with a
    fourth input, the (C,) bias): ``group_rational_plain``'s math over x's last axis, in standard ops. By default an
    If takes the plain form alone where no |x| exceeds LARGE_INPUT (half the passes in a runtime that runs node by
    node, as ONNX Runtime does); ``branch_free``: both forms per element, a chain of elementwise ops without control
    flow, which runtimes that fuse such chains (OpenVINO) compile better."""
    import itertools

    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    nodes = []
    names = itertools.count()

    def node(op_type: str, *inputs: str, into: Optional[list] = None, **attributes) -> str:
        output = f"_{next(names)}"
        (nodes if into is None else into).append(helper.make_node(op_type, list(inputs), [output], **attributes))
        return output

    def constant(value, dtype) -> str:
        return node("Constant", value=numpy_helper.from_array(np.array(value, dtype=dtype)))

    def horner(t: str, leading: str, coefficients, into: list) -> str:
        for coefficient in coefficients:
            leading = node("Add", node("Mul", leading, t, into=into), coefficient, into=into)
        return leading

    def branch(branch_nodes: list, output: str, name: str):
        return helper.make_graph(branch_nodes, name, [],
                                 [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)])

    index = [constant([i], np.int64) for i in range(7)]
    axis1 = constant([1], np.int64)
    x = node("Add", "x", "bias") if bias else "x"
    # Per-channel (C,) coefficient vectors (channel c takes the row of group c // (C / G)), which broadcast over x's
    # last axis, the case runtimes make fast; the coefficients are the model's weights, so runtimes fold this part
    # into constants.
    groups = node("Shape", "denominator", start=0, end=1)
    group_runs = node("Concat", groups, node("Div", node("Shape", x, start=-1), groups), axis=0)  # [G, C / G]
    rows = node("Expand", "numerator", node("Concat", groups, constant([6], np.int64), axis=0))  # (G, 6)
    flat = constant([-1], np.int64)

    def per_channel(table: str, i: int) -> str:
        return node("Reshape", node("Expand", node("Slice", table, index[i], index[i + 1], axis1), group_runs), flat)

    a = [per_channel(rows, i) for i in range(6)]
    abs_denominator = node("Abs", "denominator")
    b = [per_channel(abs_denominator, j) for j in range(4)]
    ax = node("Abs", x)
    one, large_input = constant(1.0, np.float32), constant(LARGE_INPUT, np.float32)
    two, tiny = constant(2.0, np.float32), constant(np.finfo(np.float32).tiny, np.float32)
    # The plain form, for a tensor whose |x| are all <= LARGE_INPUT (the usual case): half the passes of the full one.
    plain_nodes = []
    plain = node("Div", horner(x, a[5], a[4::-1], plain_nodes),
                 horner(ax, b[3], [b[2], b[1], b[0], one], plain_nodes), into=plain_nodes)
    # Otherwise per element, as group_rational_plain: above LARGE_INPUT the reciprocal form (finite where x^5 would
    # overflow), unless Q~ is below the smallest normal float (the top b's are 0: the plain form is exact).
    full_nodes = []
    large = node("Greater", ax, large_input, into=full_nodes)
    u = node("Reciprocal", node("Where", large, x, two, into=full_nodes), into=full_nodes)
    au = node("Abs", u, into=full_nodes)
    q_recip = horner(au, node("Add", au, b[0], into=full_nodes), b[1:], full_nodes)
    use = node("And", large, node("GreaterOrEqual", q_recip, tiny, into=full_nodes), into=full_nodes)
    numerator_value = node("Where", use, node("Mul", x, horner(u, a[0], a[1:], full_nodes), into=full_nodes),
                           horner(x, a[5], a[4::-1], full_nodes), into=full_nodes)
    denominator_value = node("Where", use, q_recip, horner(ax, b[3], [b[2], b[1], b[0], one], full_nodes),
                             into=full_nodes)
    full = node("Div", numerator_value, denominator_value, into=full_nodes)
    if branch_free:
        nodes.extend(full_nodes)
        nodes.append(helper.make_node("Identity", [full], ["y"]))
    else:
        # A NaN maximum (a NaN input, where the runtime's ReduceMax propagates it) takes the full form: never unsafe.
        only_small = node("LessOrEqual", node("ReduceMax", ax, keepdims=0), large_input)
        nodes.append(helper.make_node("If", [only_small], ["y"], then_branch=branch(plain_nodes, plain, "plain"),
                                      else_branch=branch(full_nodes, full, "reciprocal_where_large")))
    return helper.make_function(RATIONAL_DOMAIN, _RATIONAL_OPS[bias],
                                ["x", "numerator", "denominator"] + (["bias"] if bias else []), ["y"], nodes,
                                [helper.make_opsetid("", opset)])


def rational_functions(opset: int = DEFAULT_OPSET, branch_free: bool = False) -> list:
    """The ONNX function bodies (FunctionProto) of the ``kat_timm`` rational nodes, in standard ops of ``opset``;
    ``branch_free``: without the If that skips the large-input form (what ``inline_rationals`` writes)."""
    return [_rational_body(opset, bias, branch_free) for bias in (False, True)]


def _rational_translation():
    """The ONNX translation of ``kat_timm::group_rational`` for ``torch.onnx.export``: one ``kat_timm`` node (the
    channel axis moved last around it when it is not)."""
    import onnxscript
    from onnx.defs import OpSchema

    domain = onnxscript.values.Opset(RATIONAL_DOMAIN, 1)
    types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    ops = {}
    for bias, name in _RATIONAL_OPS.items():
        inputs = ["x", "numerator", "denominator"] + (["bias"] if bias else [])
        schema = OpSchema(name, RATIONAL_DOMAIN, 1, inputs=[OpSchema.FormalParameter(i, "T") for i in inputs],
                          outputs=[OpSchema.FormalParameter("y", "T")], type_constraints=[("T", types, "")])
        ops[bias] = onnxscript.values.Op(domain, name, schema)
    standard = onnxscript.values.Opset("", DEFAULT_OPSET)

    def translate(x, numerator, denominator, channel_dim: int, bias=None):
        rank = len(x.shape)
        cdim = channel_dim % rank
        if cdim != rank - 1:
            order = [d for d in range(rank) if d != cdim] + [cdim]
            x = standard.Transpose(x, perm=order)
        inputs = (x, numerator, denominator) + (() if bias is None else (bias,))
        y = ops[bias is not None](*inputs)
        if cdim != rank - 1:
            y = standard.Transpose(y, perm=[order.index(d) for d in range(rank)])
        return y

    return translate


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
                batch_size: int = 1, example_input: Optional[torch.Tensor] = None,
                inline_rationals: bool = False) -> Path:
    """Export ``model`` (in eval mode) to an ONNX file, input ``images``, output ``logits``, checked with
    ``onnx.checker`` and only then put at ``path`` (README, "Deployment"); ``batch_size``: the graph's fixed batch
    (with ``dynamic_batch``, the tracing batch). The rationals are ``kat_timm`` nodes with standard-op function
    bodies (the module docstring), or with ``inline_rationals`` those bodies inlined (standard ops only). A symbolic
    link at ``path`` is written through; a folder, device or FIFO there raises :class:`kat_timm.files.OutputPathError`."""
    onnx = require_packages("onnx", "onnxscript")
    check_export_target(path, opset)
    path = Path(path)
    target = Path(output_target(path))  # a link's target; a device, FIFO or folder refused (a rename replaces them)
    if example_input is None:
        example_input = _example_input(model, batch_size)
    program = export_program(model, example_input, dynamic_batch)
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
                          custom_translation_table={torch.ops.kat_timm.group_rational.default: _rational_translation()},
                          verbose=False)
        written = next(entry.version for entry in onnx.load(str(partial), load_external_data=False).opset_import
                       if entry.domain in _STANDARD_DOMAINS)
        if written != opset:
            # The exporter keeps its own opset when the version converter fails, with only a log message.
            raise OpsetConversionError(f"the ONNX exporter could not convert the graph to opset {opset} (it wrote "
                                       f"opset {written}); use opset {DEFAULT_OPSET}")
        _add_rational_functions(partial, opset, inline_rationals)
        onnx.checker.check_model(str(partial), full_check=True)
        if partial != target:
            os.replace(partial, target)
    finally:
        converter_log.setLevel(log_level)
        if partial != target:
            partial.unlink(missing_ok=True)
    return path


def _add_rational_functions(path: Path, opset: int, inline: bool) -> None:
    """Give the ONNX file at ``path`` the function bodies of its ``kat_timm`` nodes (or inline them)."""
    onnx = require_packages("onnx")
    model = onnx.load(str(path), load_external_data=False)
    used = {node.op_type for node in model.graph.node if node.domain == RATIONAL_DOMAIN}
    if not used:
        return
    # Inlined, the bodies are for runtimes that fuse elementwise chains (OpenVINO), which an If would break up.
    model.functions.extend(f for f in rational_functions(opset, branch_free=inline) if f.name in used)
    if not any(entry.domain == RATIONAL_DOMAIN for entry in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(RATIONAL_DOMAIN, 1))
    if inline:
        import onnx.inliner

        model = onnx.inliner.inline_local_functions(model)
        del model.functions[:]
        kept = [entry for entry in model.opset_import if entry.domain != RATIONAL_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    onnx.save(model, str(path))


def onnxruntime_session(path: PathLike, threads: Optional[int] = None, fast: bool = True):
    """An ONNX Runtime CPU ``InferenceSession`` of an ONNX file; with ``fast`` (default) kat_timm's rational kernel
    is registered, so the ``kat_timm`` nodes of files from ``export_onnx`` run in one native pass each.

    Args:
        path: the .onnx file.
        threads: intra-op threads (default: ONNX Runtime's choice, one per core).
        fast: register the kernel; False runs the function bodies, as a runtime without kat_timm does.

    Raises:
        MissingDependencyError: onnxruntime is not installed.
        RuntimeError: ``fast`` and the kernel could not be built (no C compiler; the message says why).
    """
    onnxruntime = require_packages("onnxruntime", purpose="running an ONNX file")
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    if fast:
        from ..ops.rational_onnxruntime import onnxruntime_session_options

        options = onnxruntime_session_options(options)
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


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
               seed: int = 0, fast: bool = False) -> Dict[int, float]:
    """{batch size: ||onnx - torch|| / ||torch||} of the ONNX file run by onnxruntime (CPU) and ``model`` on the
    same random images; ``fast``: with kat_timm's rational kernel registered (``onnxruntime_session``), else as a
    runtime without kat_timm runs it."""
    require_packages("onnxruntime", purpose="checking an ONNX file")
    session = onnxruntime_session(path, fast=fast)
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
