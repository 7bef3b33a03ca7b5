"""``KAN``: the group-rational KAN block that replaces the MLP of a ViT block (GR-KAN, KAT paper section 4)."""
from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..ops.backend import fuses_linear_bias
from ..ops.group_rational import exporting, native_in_place_pays
from ..ops.rational_reference import group_rational_reference
from .group_rational import GroupRational, check_num_groups
from .rational_inits import rational_init

__all__ = ["KAN", "rational_second_moment"]


@functools.lru_cache(maxsize=None)
def rational_second_moment(init: str, nodes: int = 200) -> float:
    """E[F(z)^2] for z ~ N(0, 1) and F the ``init`` entry of the rational table.

    Gauss-Hermite quadrature (probabilists' weights) in float64: F grows at most linearly, so F^2 is a smooth
    function of polynomial growth and 200 nodes are exact to far better than 1e-6.
    """
    z, weights = np.polynomial.hermite_e.hermegauss(nodes)
    numerator, denominator = rational_init(init)
    # Explicitly on the CPU: models may be built under `with torch.device("meta")`.
    values = group_rational_reference(
        torch.from_numpy(z).view(-1, 1),
        torch.tensor([numerator], dtype=torch.float64, device="cpu"),
        torch.tensor([denominator], dtype=torch.float64, device="cpu"),
    ).view(-1).numpy()
    return float(np.sum(weights * values**2) / math.sqrt(2 * math.pi))


class KAN(nn.Module):
    """GR-KAN block: act1 (rational, identity) -> dropout -> fc1 -> act2 (rational) -> dropout -> [norm] -> fc2.

    Accepts the keywords timm's ViT ``Block`` passes to its ``mlp_layer``, so ``VisionTransformer(mlp_layer=KAN)``
    works as is; ``act_layer`` is accepted and ignored (the activations are the rationals). Submodule names give
    the state-dict keys of the released checkpoints: ``fc1``, ``fc2``, ``act{1,2}.weight_numerator``,
    ``act{1,2}.weight_denominator``.

    Where ``kat_timm.ops.fuses_linear_bias`` says it pays (the native CPU kernel), fc1 runs as a bias-free matmul
    and act2 adds ``fc1.bias`` inside its own pass (and returns its gradient from its backward pass): the same
    function, one pass over the hidden activations fewer each way. The parameters stay where they are, so the
    state dict is the released one either way. In eager inference act2 then writes over fc1's output instead of
    allocating its own. The fusion is taken only while fc1 is exactly an ``nn.Linear`` and act2 exactly a
    ``GroupRational``, with no hooks (their own or global), no parametrization and no patched ``forward``: a LoRA /
    PEFT wrapper, a quantized Linear, a hook or a pruning mask on either is called as a module, as in any other
    timm model. TorchScript and fx tracing take the plain path.

    ``init_weights`` applies the paper's variance-preserving initialisation (section S3), which the released code
    intended but overwrote: fc1 with variance 1 / fan_in (act1 is the identity), fc2 with variance gain / fan_in,
    gain = 1 / E[F(z)^2], z ~ N(0, 1), F = act2's initial function. timm's ViT calls it after its own Linear init.

    Args:
        in_features: input width d.
        hidden_features: hidden width (4d in KAT).
        out_features: output width (default: in_features).
        act_layer: ignored (timm passes it); the activations are GroupRational.
        norm_layer: optional norm on the hidden features before fc2 (timm's ``scale_mlp_norm``).
        bias: bias in fc1 and fc2.
        drop: dropout after act1 and after act2.
        num_groups: channel groups of the rationals.
        act_init: init of act2 (a name of the rational table: "swish" as released, "gelu", ...).
        act1_init: init of act1 ("identity" as released).
        device: device of the parameters.
        dtype: dtype of the parameters.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer=None,
        norm_layer=None,
        bias: bool = True,
        drop: float = 0.0,
        num_groups: int = 8,
        act_init: str = "swish",
        act1_init: str = "identity",
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        check_num_groups(num_groups, "KAN", in_features=in_features, hidden_features=hidden_features)
        self.act1 = GroupRational(num_groups, init=act1_init, **factory)
        self.drop1 = nn.Dropout(drop)
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, **factory)
        self.act2 = GroupRational(num_groups, init=act_init, **factory)
        self.drop2 = nn.Dropout(drop)
        self.norm = norm_layer(hidden_features, **factory) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, **factory)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Variance-preserving init (paper S3): rationals from their tables, fc1 / fc2 scaled to keep unit variance."""
        self.act1.reset_parameters()
        self.act2.reset_parameters()
        # act1 is (close to) the identity: fc1 sees unit-variance inputs and keeps them at unit variance.
        act1_gain = 1.0 / rational_second_moment(self.act1.init)
        act2_gain = 1.0 / rational_second_moment(self.act2.init)
        nn.init.normal_(self.fc1.weight, std=math.sqrt(act1_gain / self.fc1.in_features))
        nn.init.normal_(self.fc2.weight, std=math.sqrt(act2_gain / self.fc2.in_features))
        for linear in (self.fc1, self.fc2):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def reset_parameters(self) -> None:
        """The same init as ``init_weights``, for code that re-initialises through ``reset_parameters`` (timm's
        ``"reset"`` mode, e.g. after ``to_empty``): it runs after the children's own resets and overrides them."""
        self.init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(x)
        x = self.drop1(x)
        x = self._fc1_act2(x)
        x = self.drop2(x)
        x = self.norm(x)
        return self.fc2(x)

    def _fc1_act2(self, x: torch.Tensor) -> torch.Tensor:
        """act2(fc1(x)), with fc1's bias added inside act2's pass where that pays, and in inference written over
        fc1's output (which nothing else reads) instead of into a new tensor."""
        if not torch.jit.is_scripting():
            # fx symbolic tracing hands a Proxy, whose device can't be asked: it records the plain path.
            if not isinstance(x, torch.fx.Proxy) and fuses_linear_bias(x) and _bare(self.fc1, self.act2):
                hidden = F.linear(x, self.fc1.weight)
                if self._in_place_ok(hidden):
                    return self.act2.forward_(hidden, self.fc1.bias)
                return self.act2(hidden, self.fc1.bias)
        return self.act2(self.fc1(x))

    def _in_place_ok(self, hidden: torch.Tensor) -> bool:
        """Whether act2 may overwrite ``hidden``: inference (no autograd graph to keep its input for), eager or
        under torch.compile where the native kernel pays there (then the graph writes act2 over fc1's output too;
        otherwise inductor fuses act2's pointwise ops into a kernel of its own), not in an exported program (which
        keeps the functional op) or a jit trace (which would record a copy)."""
        if exporting() or torch.jit.is_tracing() or type(hidden) is not torch.Tensor:
            return False
        if torch.compiler.is_compiling() and not native_in_place_pays(hidden):
            return False
        if not torch.is_grad_enabled():
            return True
        bias = self.fc1.bias
        return not (hidden.requires_grad or self.act2.weight_numerator.requires_grad
                    or self.act2.weight_denominator.requires_grad or (bias is not None and bias.requires_grad))


def _bare(fc1: nn.Module, act2: nn.Module) -> bool:
    """Whether calling ``fc1`` and ``act2`` runs exactly ``nn.Linear.forward`` and ``GroupRational.forward`` and
    nothing else, so that KAN may compute what the calls would compute without making them: the exact types (not a
    wrapper or a parametrized or quantized subclass), no hooks, global (checked once: this runs on every forward) or
    their own (forward, pre-forward, backward), and no ``forward`` patched on the instance (as accelerate's hooks
    do)."""
    hooks = nn.modules.module
    if (hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
            or hooks._global_backward_pre_hooks):
        return False
    return type(fc1) is nn.Linear and type(act2) is GroupRational and _no_own_hooks(fc1) and _no_own_hooks(act2)


def _no_own_hooks(module: nn.Module) -> bool:
    """No hook registered on ``module`` itself and no ``forward`` patched on the instance."""
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__)
