"""Kernels, references and dispatch of the grouped rational function.

- ``group_rational``: the op (custom ``torch.library`` ops, all backends); ``group_rational_`` in place (inference);
- ``group_rational_reference``: the float64 reference tests and benchmarks compare against;
- ``group_rational_autograd``: the same formula with plain differentiable PyTorch ops (TorchScript);
- ``select_backend`` / ``native_cpu_status`` / ``triton_status`` / ``triton_fallbacks``: which implementation runs,
  and why;
- ``fuses_linear_bias``: whether a Linear before the op hands its bias to the op (``group_rational(..., bias=)``);
- ``register_flop_formulas``: the op's FLOP counts for ``torch.utils.flop_counter`` (done at import);
- ``rational_onnxruntime``: the ONNX Runtime kernel of the rational nodes of kat_timm's ONNX files (imported on use).
"""
from .backend import (BACKEND_ENV, BACKENDS, fuses_linear_bias, requested_backend, select_backend, triton_fallbacks,
                      triton_status)
from .flops import register_flop_formulas  # importing registers them with torch.utils.flop_counter
from .group_rational import group_rational, group_rational_
from .rational_cpu import native_cpu_status
from .rational_reference import group_rational_reference
from .rational_torch import group_rational_autograd

__all__ = [
    "BACKEND_ENV",
    "BACKENDS",
    "fuses_linear_bias",
    "group_rational",
    "group_rational_",
    "group_rational_autograd",
    "group_rational_reference",
    "native_cpu_status",
    "register_flop_formulas",
    "requested_backend",
    "select_backend",
    "triton_fallbacks",
    "triton_status",
]
