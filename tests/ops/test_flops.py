"""FLOP formulas of the rational op (kat_timm/ops/flops.py) under torch.utils.flop_counter.FlopCounterMode.

The op must count exactly numel x the documented per-element cost, forward and backward, on real and meta tensors;
a KAT forward must count exactly the ViT's FLOPs (same linear layers, GELU uncounted) plus its rationals.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from kat_timm.layers import GroupRational  # importing kat_timm registers the models and the FLOP formulas
from kat_timm.ops import flops, group_rational_reference
from kat_timm.ops.flops import RATIONAL_BACKWARD_FLOPS_PER_ELEMENT, RATIONAL_FORWARD_FLOPS_PER_ELEMENT

FORWARD_OP = torch.ops.kat_timm.group_rational
BACKWARD_OP = torch.ops.kat_timm.group_rational_backward


def _counts(run) -> dict:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_flop_counts()["Global"]


KERNEL_SOURCE = Path(flops.__file__).with_name("csrc") / "group_rational_cpu.c"


class _Counted:
    """A value in the native kernel's per-element code: counts every operation it takes part in.

    ``value`` is a float, so the same code also computes what the kernel computes. Operations whose operands are
    all per-group constants (``2.0f * a2``, hoisted out of the loop by the compiler) are not per element and are not
    counted, as the FLOP formulas' docstring says. A comparison costs nothing by itself; the select ``c ? a : b``
    that uses it counts one, as the docstring's "sign(x) select" does.
    """

    ops = 0

    def __init__(self, value: float, per_element: bool):
        self.value, self.per_element = value, per_element

    @classmethod
    def _lift(cls, other) -> "_Counted":
        return other if isinstance(other, _Counted) else cls(float(other), False)

    def _apply(self, other, fn, count: bool = True) -> "_Counted":
        other = self._lift(other)
        per_element = self.per_element or other.per_element
        if per_element and count:
            _Counted.ops += 1
        return _Counted(fn(self.value, other.value), per_element)

    __add__ = lambda self, o: self._apply(o, lambda a, b: a + b)  # noqa: E731
    __radd__ = lambda self, o: self._apply(o, lambda a, b: b + a)  # noqa: E731
    __sub__ = lambda self, o: self._apply(o, lambda a, b: a - b)  # noqa: E731
    __rsub__ = lambda self, o: self._apply(o, lambda a, b: b - a)  # noqa: E731
    __mul__ = lambda self, o: self._apply(o, lambda a, b: a * b)  # noqa: E731
    __rmul__ = lambda self, o: self._apply(o, lambda a, b: b * a)  # noqa: E731
    __truediv__ = lambda self, o: self._apply(o, lambda a, b: a / b)  # noqa: E731
    __rtruediv__ = lambda self, o: self._apply(o, lambda a, b: b / a)  # noqa: E731
    __lt__ = lambda self, o: self._apply(o, lambda a, b: float(a < b), count=False)  # noqa: E731


def _fabsf(t: _Counted) -> _Counted:
    if t.per_element:
        _Counted.ops += 1
    return _Counted(abs(t.value), t.per_element)


def _select(condition: _Counted, if_true, if_false) -> _Counted:
    if condition.per_element:
        _Counted.ops += 1
    chosen = _Counted._lift(if_true if condition.value else if_false)
    return _Counted(chosen.value, chosen.per_element or condition.per_element)


def _macro_statements(source: str, name: str) -> list:
    """The C statements of ``#define name(...)``, with nested macro calls of the same file expanded."""
    match = re.search(rf"^#define {name}\(([^)]*)\)((?:.*\\\n)*.*)$", source, re.M)
    assert match, f"{KERNEL_SOURCE.name}: macro {name} not found (the FLOP check reads the kernel's source)"
    body = " ".join(line.rstrip("\\").strip() for line in match.group(2).splitlines())
    # A nested macro of this file, e.g. KAT_P_Q(xv) inside KAT_VALUE, stands for its statements.
    body = re.sub(r"\b(KAT_[A-Z_]+)\(xv(?:, gv)?\)", lambda m: "; ".join(_macro_statements(source, m.group(1))) + ";",
                  body)
    return [statement.strip() for statement in body.split(";") if statement.strip()]


def _as_python(statement: str) -> list:
    """``const float a = e1, b = e2;`` or ``s0 += e0;`` in C -> Python assignments (float literals, fabsf, ?:)."""
    statement = re.sub(r"(\d+\.\d*)f\b", r"\1", statement.strip().rstrip(";"))
    statement = re.sub(r"^const float ", "", statement)
    assignments, depth, start = [], 0, 0
    for i, char in enumerate(statement + ","):  # split on the commas between declarators, not inside calls
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            assignments.append(statement[start:i].strip())
            start = i + 1
    python = []
    for assignment in assignments:
        target, op, expression = re.fullmatch(r"(\w+)\s*(\+?=)\s*(.+)", assignment).groups()
        ternary = re.fullmatch(r"(.+?)\s*\?\s*(.+?)\s*:\s*(.+)", expression)
        if ternary:
            expression = "_select({}, {}, {})".format(*ternary.groups())
        python.append(f"{target} {op} {expression.replace('fabsf(', '_fabsf(')}")
    return python


def _count_kernel_code(statements: list, x: float, grad: float, a, b) -> tuple:
    """Run the kernel's statements on one element; (operations counted, the names they defined)."""
    names = {"_fabsf": _fabsf, "_select": _select, "xv": _Counted(x, True), "gv": _Counted(grad, True)}
    names.update({f"a{i}": _Counted(float(v), False) for i, v in enumerate(a)})
    names.update({f"b{j + 1}": _Counted(float(v), False) for j, v in enumerate(b)})
    names.update({f"{s}": _Counted(0.0, True) for s in ("s0 s1 s2 s3 s4 s5 t1 t2 t3 t4".split())})
    _Counted.ops = 0
    for statement in statements:
        for line in _as_python(statement):
            exec(line, {}, names)  # our own kernel source, read from the package
    return _Counted.ops, names


def test_per_element_counts_match_the_native_kernels_operations():
    """The documented costs are the operations the native kernel's per-element code does (read from its source).

    The same code, run on floats, must give F and dF/dx of the float64 reference, so the check reads the real
    formula and not a misparsed one.
    """
    source = KERNEL_SOURCE.read_text()
    a = [0.1, 0.9, -0.3, 0.2, 0.05, -0.02]
    b = [0.4, -0.2, 0.1, 0.3]
    x, grad = -0.7, 1.3
    numerator, denominator = torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)
    ref_y, ref_dx, ref_dnum, ref_dden = group_rational_reference(
        torch.tensor([[x]], dtype=torch.float64), numerator, denominator, grad_output=torch.tensor([[grad]],
                                                                                                    dtype=torch.float64))
    b_abs = [abs(v) for v in b]  # the kernel loads |b| once per group (load_coeffs)

    forward_ops, names = _count_kernel_code(_macro_statements(source, "KAT_VALUE"), x, grad, a, b_abs)
    assert names["yv"].value == pytest.approx(ref_y.item(), rel=1e-12), "the parsed forward does not compute F"
    assert forward_ops == RATIONAL_FORWARD_FLOPS_PER_ELEMENT, (
        f"the native forward does {forward_ops} operations per element; RATIONAL_FORWARD_FLOPS_PER_ELEMENT says "
        f"{RATIONAL_FORWARD_FLOPS_PER_ELEMENT}")

    # One element of the backward loop: the terms, then the ten running sums.
    loop = re.search(r"^#define KAT_BACKWARD_PIECE_LOOP\(.*?\n((?:.*\\\n)*)", source, re.M).group(1)
    sums = [s for s in re.findall(r"\b[st]\d \+= e\d;", loop)]
    assert len(sums) == 10, f"expected the ten coefficient sums in the backward loop, found {sums}"
    statements = _macro_statements(source, "KAT_BACKWARD_TERMS") + sums
    backward_ops, names = _count_kernel_code(statements, x, grad, a, b_abs)
    assert names["dxv"].value == pytest.approx(ref_dx.item(), rel=1e-12), "the parsed backward does not give dF/dx"
    assert [names[f"s{i}"].value for i in range(6)] == pytest.approx(ref_dnum[0].tolist(), rel=1e-12)
    # grad of b_j is -sign(b_j) t_j (coefficient_grads): t_j = g F |x|^j / Q.
    sign_b = [-1.0 if v < 0 else 1.0 for v in b]
    assert [-sign_b[j] * names[f"t{j + 1}"].value for j in range(4)] == pytest.approx(ref_dden[0].tolist(), rel=1e-12)
    assert backward_ops == RATIONAL_BACKWARD_FLOPS_PER_ELEMENT, (
        f"the native backward does {backward_ops} operations per element; RATIONAL_BACKWARD_FLOPS_PER_ELEMENT says "
        f"{RATIONAL_BACKWARD_FLOPS_PER_ELEMENT}")


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("shape, channel_dim", [((3, 7, 40), -1), ((2, 24, 5, 3), 1)])
def test_group_rational_layer_counts_numel_times_per_element(device, shape, channel_dim):
    layer = GroupRational(num_groups=8, init="swish", channel_dim=channel_dim, device=device)
    x = torch.randn(shape, device=device, requires_grad=True)
    numel = x.numel()

    forward = _counts(lambda: layer(x))
    assert forward == {FORWARD_OP: numel * RATIONAL_FORWARD_FLOPS_PER_ELEMENT}, forward

    # A dense upstream gradient (not .sum()'s stride-0 one), as in training.
    grad = torch.randn(shape, device=device)
    step = _counts(lambda: layer(x).backward(grad))
    assert step == {
        FORWARD_OP: numel * RATIONAL_FORWARD_FLOPS_PER_ELEMENT,
        BACKWARD_OP: numel * RATIONAL_BACKWARD_FLOPS_PER_ELEMENT,
    }, step


def test_registration_is_idempotent():
    before = {op: flops.flop_counter.flop_registry[op] for op in (FORWARD_OP, BACKWARD_OP)}
    flops.register_flop_formulas()
    importlib.reload(flops)  # torch raises on a duplicate registration; ours must not
    assert {op: flops.flop_counter.flop_registry[op] for op in (FORWARD_OP, BACKWARD_OP)} == before


def _model_counts(name: str, x: torch.Tensor, backward: bool) -> dict:
    model = timm.create_model(name, device="meta")

    def run():
        out = model(x)
        if backward:
            out.backward(torch.ones_like(out))

    with torch.set_grad_enabled(backward):
        return _counts(run)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "train_step"])
def test_kat_tiny_counts_vit_tiny_plus_rationals(backward):
    """KAT-T and ViT-T share every linear layer and the attention; KAT replaces GELU (which FlopCounterMode does not
    count) by two rationals per block: act1 on the embed dim, act2 on the 4x hidden dim, at every token."""
    batch, depth, embed, tokens = 2, 12, 192, 197  # 196 patches + the class token
    x = torch.empty(batch, 3, 224, 224, device="meta")
    kat = _model_counts("kat_tiny_patch16_224", x, backward)
    vit = _model_counts("vit_tiny_patch16_224", x, backward)

    assert not any("gelu" in str(op) for op in vit), f"FlopCounterMode counted GELU: {vit}"
    rational_elements = depth * batch * tokens * (embed + 4 * embed)
    expected_rational = {FORWARD_OP: rational_elements * RATIONAL_FORWARD_FLOPS_PER_ELEMENT}
    if backward:
        expected_rational[BACKWARD_OP] = rational_elements * RATIONAL_BACKWARD_FLOPS_PER_ELEMENT
    assert {op: n for op, n in kat.items() if op in (FORWARD_OP, BACKWARD_OP)} == expected_rational
    # Everything else, op by op, is the ViT's.
    assert {op: n for op, n in kat.items() if op not in (FORWARD_OP, BACKWARD_OP)} == vit
    assert sum(kat.values()) == sum(vit.values()) + sum(expected_rational.values())
