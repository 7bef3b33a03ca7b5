"""``kat_timm.tools.export``: the plain-ops rational, torch.export of a KAT, and ONNX files of standard ops only.

The models are kat_tiny at 32 x 32 pixels (4 patches: export time grows with the graph, not the image) with jittered
random weights, so that every rational differs from its init. The ONNX file is exported once per module.
"""
from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys

import pytest
import timm
import torch

import kat_timm.tools.export as export_module
from kat_timm.tools.export import (
    RATIONAL_DOMAIN,
    MissingDependencyError,
    check_onnx,
    decompose_rationals,
    export_onnx,
    export_program,
    group_rational_plain,
    model_input_size,
    onnx_io_shapes,
    onnx_op_domains,
    onnxruntime_session,
    rational_functions,
    standard_domains_only,
)
from kat_timm.ops import group_rational_reference
from tests.conftest import random_kat_tiny_32
from tests.helpers import random_coefficients, relative_error

RATIONAL_OP = torch.ops.kat_timm.group_rational.default
ONNX_RTOL = 1e-4
HAS_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript"))
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason='onnx/onnxscript not installed (pip install onnx onnxscript onnxruntime)')
needs_ort = pytest.mark.skipif(not HAS_ORT, reason='onnxruntime not installed (pip install onnx onnxscript onnxruntime)')


@pytest.fixture(scope="module")
def kat_tiny_32():
    return random_kat_tiny_32(7)


@pytest.fixture(scope="module")
def onnx_file(kat_tiny_32, tmp_path_factory):
    """kat_tiny_32 exported once, with a dynamic batch dimension (traced with batch 2)."""
    if not HAS_ONNX:
        pytest.skip('onnx/onnxscript not installed (pip install onnx onnxscript onnxruntime)')
    path = tmp_path_factory.mktemp("onnx") / "kat_tiny_32.onnx"
    return export_onnx(kat_tiny_32, path, dynamic_batch=True, batch_size=2)


@pytest.mark.parametrize("shape,channel_dim", [((3, 7, 64), -1), ((5, 40), -1), ((2, 40, 5, 3), 1), ((16, 2, 3), 0)])
@pytest.mark.parametrize("shared_numerator", [True, False])
def test_plain_formula_matches_the_reference(shape, channel_dim, shared_numerator):
    x = torch.randn(shape, dtype=torch.float64) * 2
    numerator, denominator = (t.detach().double() for t in random_coefficients(8, shared_numerator))
    expected = group_rational_reference(x, numerator, denominator, channel_dim)
    actual = group_rational_plain(x.float(), numerator.float(), denominator.float(), channel_dim)
    assert actual.shape == x.shape and actual.dtype == torch.float32
    assert relative_error(actual, expected) <= 1e-5


@pytest.mark.parametrize("shape,channel_dim", [((3, 7, 64), -1), ((2, 40, 5, 3), 1), ((16, 2, 3), 0)])
def test_plain_formula_with_bias_matches_the_reference(shape, channel_dim):
    x = torch.randn(shape, dtype=torch.float64) * 2
    bias = torch.randn(shape[channel_dim], dtype=torch.float64)
    numerator, denominator = (t.detach().double() for t in random_coefficients(8, shared_numerator=False))
    expected = group_rational_reference(x, numerator, denominator, channel_dim, bias=bias)
    actual = group_rational_plain(x.float(), numerator.float(), denominator.float(), channel_dim, bias.float())
    assert relative_error(actual, expected) <= 1e-5


def test_plain_formula_low_precision_and_channels_last():
    numerator, denominator = (t.detach() for t in random_coefficients(8, shared_numerator=False))
    image = torch.randn(2, 32, 5, 7).to(memory_format=torch.channels_last)
    expected = group_rational_reference(image.double(), numerator.double(), denominator.double(), 1)
    assert relative_error(group_rational_plain(image, numerator, denominator, 1), expected) <= 1e-5
    low = group_rational_plain(image.bfloat16(), numerator, denominator, 1)
    assert low.dtype == torch.bfloat16
    # float32 math: only the input's and the output's rounding to bfloat16 remain.
    assert relative_error(low, expected) <= 2e-2


def test_torch_export_keeps_the_custom_op_and_matches_eager(kat_tiny_32):
    program = export_program(kat_tiny_32, dynamic_batch=True)
    rational_nodes = [node for node in program.graph.nodes if node.target is RATIONAL_OP]
    assert len(rational_nodes) == 24, "act1 and act2 of 12 blocks, each one kat_timm::group_rational node"
    # Exported on the CPU, where fc1's bias is act2's input bias (kat_timm.ops.fuses_linear_bias).
    assert sum(len(node.args) == 5 and node.args[4] is not None for node in rational_nodes) == 12
    exported = program.module()
    for batch in (2, 3):  # 3: the batch dimension is symbolic
        images = torch.randn(batch, *model_input_size(kat_tiny_32))
        with torch.no_grad():
            torch.testing.assert_close(exported(images), kat_tiny_32(images), rtol=1e-5, atol=1e-6)
    assert kat_tiny_32.training is False


def test_decomposed_program_has_plain_ops_only_and_matches(kat_tiny_32):
    program = decompose_rationals(export_program(kat_tiny_32))
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert RATIONAL_OP not in targets
    assert not any("kat_timm" in str(target) for target in targets)
    assert targets.count(torch.ops.aten.abs.default) >= 48, "|b| and |x| of 24 rationals"
    assert torch.ops.aten.div.Tensor in targets
    images = torch.randn(2, *model_input_size(kat_tiny_32))  # the traced (static) batch size
    with torch.no_grad():
        # The plain formula rounds differently from the fused kernel; 12 blocks amplify that to a few 1e-6 of the
        # logits' scale, so compare relative to the whole tensor, not element by element.
        assert relative_error(program.module()(images), kat_tiny_32(images)) < 1e-5


@needs_onnx
def _nodes_with_subgraphs(nodes):
    """Every node of ``nodes`` and of the graphs in their attributes (an If's branches), depth first."""
    for node in nodes:
        yield node
        for attribute in node.attribute:
            for graph in [attribute.g, *attribute.graphs]:
                yield from _nodes_with_subgraphs(graph.node)


def test_onnx_file_has_one_rational_node_each_with_a_standard_op_body(onnx_file):
    import onnx
    import onnx.inliner

    domains = onnx_op_domains(onnx_file)
    assert set(domains) == {"", RATIONAL_DOMAIN}, domains
    model = onnx.load(str(onnx_file))
    rationals = [node.op_type for node in model.graph.node if node.domain == RATIONAL_DOMAIN]
    # act1 of 12 blocks, and act2 with fc1's bias folded in (on the CPU, kat_timm.ops.fuses_linear_bias).
    assert sorted(rationals) == ["GroupRational"] * 12 + ["GroupRationalBias"] * 12
    assert {(f.domain, f.name) for f in model.functions} == {(RATIONAL_DOMAIN, "GroupRational"),
                                                              (RATIONAL_DOMAIN, "GroupRationalBias")}
    for function in model.functions:
        body = list(_nodes_with_subgraphs(function.node))
        assert {node.domain for node in body} == {""}, f"{function.name}: a body of standard ops only"
        # The plain form where every |x| <= LARGE_INPUT (If on the ReduceMax), else both forms per element (Where).
        assert {"Abs", "Div", "Mul", "Add", "Where", "If", "ReduceMax"} <= {node.op_type for node in body}
    assert [entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")] == [18]
    onnx.checker.check_model(model, full_check=True)
    assert onnx_io_shapes(onnx_file) == {"images": ["batch", 3, 32, 32], "logits": ["batch", 1000]}
    inlined = onnx.inliner.inline_local_functions(model)
    assert standard_domains_only({node.domain: {node.op_type} for node in inlined.graph.node})


@needs_onnx
@needs_ort
def test_inline_rationals_writes_standard_ops_only(tmp_path):
    import onnx

    model = timm.create_model("kat_tiny", img_size=32, depth=1, num_classes=10).eval()
    path = export_onnx(model, tmp_path / "inlined.onnx", inline_rationals=True)
    assert standard_domains_only(onnx_op_domains(path))
    inlined = onnx.load(str(path))
    assert not inlined.functions, "no local functions left"
    assert "If" not in {node.op_type for node in inlined.graph.node}, "branch-free bodies (for fusing runtimes)"
    assert check_onnx(path, model, batch_sizes=(1,))[1] <= ONNX_RTOL


@needs_onnx
@needs_ort
@pytest.mark.parametrize("fast", [False, True], ids=["function-bodies", "kat_timm-kernel"])
def test_onnxruntime_matches_pytorch_for_several_batch_sizes(onnx_file, kat_tiny_32, fast):
    errors = check_onnx(onnx_file, kat_tiny_32, batch_sizes=(2, 3, 1), fast=fast)
    assert set(errors) == {1, 2, 3}
    for batch, error in errors.items():
        assert error <= ONNX_RTOL, f"batch {batch}: relative error {error:.2e}"


@needs_onnx
@needs_ort
def test_the_file_runs_where_kat_timm_is_not_imported(onnx_file, kat_tiny_32, tmp_path):
    """Another process runs the file with plain onnxruntime (kat_timm never imported) and gets PyTorch's logits."""
    import numpy as np

    images = torch.randn(3, *model_input_size(kat_tiny_32), generator=torch.Generator().manual_seed(3))
    np.save(tmp_path / "images.npy", images.numpy())
    script = (
        "import sys, numpy, onnxruntime\n"
        f"session = onnxruntime.InferenceSession({str(onnx_file)!r}, providers=['CPUExecutionProvider'])\n"
        f"images = numpy.load({str(tmp_path / 'images.npy')!r})\n"
        f"numpy.save({str(tmp_path / 'logits.npy')!r}, session.run(None, {{'images': images}})[0])\n"
        "assert not any(name.startswith('kat_timm') for name in sys.modules), 'kat_timm was imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    with torch.inference_mode():
        expected = kat_tiny_32(images)
    assert relative_error(torch.from_numpy(np.load(tmp_path / "logits.npy")), expected) <= ONNX_RTOL


def _one_rational_file(path, shape, numerator, denominator, bias=None, branch_free=False):
    """An ONNX file at ``path`` of one kat_timm rational node (GroupRationalBias with a bias) on a float32 input
    ``x`` of ``shape``, its coefficients (and bias) as initializers and its function bodies; returns the model."""
    import onnx
    from onnx import helper

    inputs = ["x", "numerator", "denominator"] + ([] if bias is None else ["bias"])
    weights = [numerator, denominator] + ([] if bias is None else [bias])
    graph = helper.make_graph(
        [helper.make_node("GroupRational" if bias is None else "GroupRationalBias", inputs, ["y"],
                          domain=RATIONAL_DOMAIN)], "rational",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, list(shape))],
        [onnx.numpy_helper.from_array(t.numpy(), name) for t, name in zip(weights, inputs[1:])])
    model = helper.make_model(graph, functions=rational_functions(18, branch_free=branch_free),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(RATIONAL_DOMAIN, 1)])
    onnx.save(model, str(path))
    return model


@needs_onnx
@needs_ort
@pytest.mark.parametrize("shape,shared_numerator,scale", [((3, 50, 1024), True, 2.0), ((7, 40), False, 3.0),
                                                          ((2, 197, 768), True, 1e4), ((1, 8), False, 1e37)])
@pytest.mark.parametrize("branch_free", [False, True], ids=["if-body", "branch-free-body"])
def test_onnxruntime_kernel_equals_the_function_body(shape, shared_numerator, scale, branch_free, tmp_path):
    """One kat_timm node run by the registered kernel and by its function body (many row tasks for the thread
    pool, a per-group numerator, inputs on both sides of LARGE_INPUT up to float32's limit; the body with its If on
    the largest |x| and the branch-free one that --inline-rationals writes): the same values, and the reference's."""
    import numpy as np
    import onnx

    numerator, denominator = (t.detach() for t in random_coefficients(8, shared_numerator))
    bias = torch.randn(shape[-1])
    x = torch.randn(shape) * scale
    path = tmp_path / "rational.onnx"
    onnx.checker.check_model(_one_rational_file(path, shape, numerator, denominator, bias, branch_free),
                             full_check=True)
    outputs = {fast: onnxruntime_session(path, threads=2, fast=fast).run(None, {"x": x.numpy()})[0]
               for fast in (False, True)}
    expected = group_rational_reference(x.double(), numerator.double(), denominator.double(), bias=bias.double())
    for fast, y in outputs.items():
        assert np.isfinite(y).all(), f"fast={fast}: non-finite values"
        assert relative_error(torch.from_numpy(y), expected) <= 1e-5, f"fast={fast}"
    np.testing.assert_allclose(outputs[True], outputs[False], rtol=2e-5, atol=1e-6 * np.abs(outputs[False]).max())


@needs_onnx
@needs_ort
def test_function_body_with_a_nan_beside_a_large_input(tmp_path):
    """A NaN stays where it is and a large input beside it still gets its finite value: the body's If on the
    largest |x| must not take the plain form (which overflows above ~5e7) because of the NaN."""
    import numpy as np

    numerator, denominator = (t.detach() for t in random_coefficients(8, shared_numerator=True))
    denominator = denominator.abs() + 0.1  # |b4| > 0: F grows like x, finite for every finite x
    x = torch.randn(2, 16)
    x[0, 3], x[1, 9] = float("nan"), 3e30
    path = tmp_path / "rational.onnx"
    _one_rational_file(path, x.shape, numerator, denominator)
    y = onnxruntime_session(path, threads=1, fast=False).run(None, {"x": x.numpy()})[0]
    expected = group_rational_reference(x.double(), numerator.double(), denominator.double())
    assert np.isnan(y[0, 3]) and np.isfinite(np.delete(y.ravel(), 3)).all()
    finite = ~torch.isnan(x)
    assert relative_error(torch.from_numpy(y)[finite], expected[finite]) <= 1e-5


@needs_ort
def test_onnxruntime_kernel_names_a_wrong_input(tmp_path):
    path = tmp_path / "bad.onnx"
    _one_rational_file(path, (2, 20), torch.ones(1, 6), torch.ones(8, 4))
    session = onnxruntime_session(path, fast=True)
    with pytest.raises(Exception, match="the last axis is not a multiple of G"):
        session.run(None, {"x": torch.ones(2, 20).numpy()})


@needs_ort
def test_check_onnx_notices_a_changed_rational(onnx_file, kat_tiny_32):
    other = copy.deepcopy(kat_tiny_32)
    with torch.no_grad():
        other.blocks[-1].mlp.act2.weight_numerator.mul_(1.1)  # one rational of 24, 10% larger
    assert check_onnx(onnx_file, other)[2] > 10 * ONNX_RTOL


def test_missing_output_folder_is_reported_before_exporting(kat_tiny_32, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "export_program", lambda *a, **k: pytest.fail("exported anyway"))
    with pytest.raises(FileNotFoundError, match=r"output folder .*missing does not exist; create it first"):
        export_onnx(kat_tiny_32, tmp_path / "missing" / "model.onnx")
    with pytest.raises(ValueError, match="opset 16 is too old: a KAT needs opset 17 or newer"):
        export_onnx(kat_tiny_32, tmp_path / "model.onnx", opset=16)


def test_missing_onnx_packages_say_how_to_install_them(kat_tiny_32, tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else
                        real_find_spec(name, *a))
    with pytest.raises(MissingDependencyError, match=r'ONNX export needs onnxscript .*pip install onnx onnxscript'):
        export_onnx(kat_tiny_32, tmp_path / "model.onnx")


def test_failed_export_leaves_no_file_and_keeps_an_existing_one(kat_tiny_32, tmp_path, monkeypatch):
    def half_written(program, args, path, **kwargs):
        open(path, "wb").write(b"half an onnx file")
        raise RuntimeError("exporter failed midway")

    monkeypatch.setattr(export_module, "export_program", lambda *a, **k: None)  # only the writing is under test
    monkeypatch.setattr(export_module, "decompose_rationals", lambda program: program)
    monkeypatch.setattr(torch.onnx, "export", half_written)
    output = tmp_path / "model.onnx"
    output.write_bytes(b"the previous export")
    with pytest.raises(RuntimeError, match="exporter failed midway"):
        export_onnx(kat_tiny_32, output)
    assert output.read_bytes() == b"the previous export"
    assert [path.name for path in tmp_path.iterdir()] == ["model.onnx"], "a partial file was left behind"


@needs_onnx
def test_opset_newer_than_onnx_knows_is_refused_before_exporting(kat_tiny_32, tmp_path, monkeypatch):
    import onnx

    monkeypatch.setattr(export_module, "export_program", lambda *a, **k: pytest.fail("an export was started"))
    newest = onnx.defs.onnx_opset_version()
    with pytest.raises(ValueError, match=f"opset {newest + 1} is newer than the installed onnx"):
        export_onnx(kat_tiny_32, tmp_path / "model.onnx", opset=newest + 1)


def test_model_input_size_follows_the_model():
    model = timm.create_model("kat_tiny", img_size=48, weight_init="skip")
    assert model_input_size(model) == (3, 48, 48)
    model.set_input_size(img_size=(64, 64))
    assert model_input_size(model) == (3, 64, 64)
    assert model_input_size(timm.create_model("resnet18")) == (3, 224, 224)
