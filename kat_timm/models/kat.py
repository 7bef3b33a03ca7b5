"""Kolmogorov-Arnold Transformer (KAT) for timm.

Paper: "Kolmogorov-Arnold Transformer", Xingyi Yang and Xinchao Wang, 2024 (https://arxiv.org/abs/2409.10594).
Released weights: https://huggingface.co/adamdad (MIT licence).

A KAT is timm's ``VisionTransformer`` with the MLP of every block replaced by a group-rational KAN
(``kat_timm.layers.KAN``). This module is a thin layer on timm's ViT: the ``KAT`` subclass (KAN blocks, the
paper's variance-preserving init, mimetic attention init, rational coefficients exempt from weight decay), the
pretrained configs of the six released checkpoints, and one ``@register_model`` entry point per name.
"""
from __future__ import annotations

import logging
import math
import re
from functools import partial
from typing import Any, Dict, Mapping, Optional, Set

import torch
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import VisionTransformer, build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn

from ..checkpoint import check_floating, unwrap_state_dict
from ..layers import KAN, GroupRational, check_num_groups, rational_init

_logger = logging.getLogger(__name__)

__all__ = ["KAT", "RELEASED_TOP1", "checkpoint_filter_fn", "mimetic_attention_init_"]

ATTN_INITS = ("mimetic", "timm")
RATIONAL_PARAMETERS = ("weight_numerator", "weight_denominator")

# ImageNet-1k top-1 (%) reported with the released checkpoints: (from scratch, from ViT ".vitft").
RELEASED_TOP1 = {"tiny": (74.6, 75.7), "small": (81.2, 82.0), "base": (82.3, 82.8)}

# A ViT MLP computes fc2(GELU(fc1(x))): the KAN equivalent has act1 = identity, act2 = GELU. The GELU fit on
# [-10, 10], not the [-3, 3] one: trained ViTs' fc1 outputs reach |x| ~ 10 (README, "From a ViT").
VIT_ACT1_INIT, VIT_ACT2_INIT = "identity", "gelu_wide"


def _rational_entries(prefix: str, num_groups: int, dtype=torch.float32) -> Dict[str, torch.Tensor]:
    entries = {}
    for act, init in (("act1", VIT_ACT1_INIT), ("act2", VIT_ACT2_INIT)):
        numerator, denominator = rational_init(init)
        entries[f"{prefix}{act}.weight_numerator"] = torch.tensor([numerator], dtype=dtype)
        entries[f"{prefix}{act}.weight_denominator"] = torch.tensor([denominator], dtype=dtype).repeat(num_groups, 1)
    return entries


def vit_state_dict_to_kat(
    state_dict: Mapping[str, torch.Tensor], num_groups: int = 8, prefix: str = ""
) -> Dict[str, torch.Tensor]:
    """A ViT state dict with the rational coefficients of a function-preserving KAT added (act1 identity, act2
    GELU fit) for every block that has an ``mlp.fc1`` and no rationals yet. Other keys are passed through."""
    out = dict(state_dict)
    pattern = re.compile(re.escape(prefix) + r"(blocks\.\d+\.mlp\.)fc1\.weight$")
    for key in state_dict:
        match = pattern.match(key)
        if match and f"{prefix}{match.group(1)}act1.weight_numerator" not in out:
            out.update(_rational_entries(prefix + match.group(1), num_groups, state_dict[key].dtype))
    return out


@torch.no_grad()
def set_rationals_for_vit_mlp_(model: nn.Module, act2_init: str = VIT_ACT2_INIT) -> None:
    """Set every KAN block of ``model`` to act1 = identity, act2 = GELU fit (after loading ViT weights into it).

    Args:
        model: a KAT (or any model whose KAN blocks are named ``*.mlp``).
        act2_init: the init table's entry for act2 (default: the conversion's GELU fit, ``"gelu_wide"``).
    """
    for name, module in model.named_modules():
        if isinstance(module, GroupRational) and name.endswith(("mlp.act1", "mlp.act2")):
            init = VIT_ACT1_INIT if name.endswith("act1") else act2_init
            numerator, denominator = rational_init(init)
            module.weight_numerator.copy_(torch.tensor([numerator]))
            module.weight_denominator.copy_(torch.tensor([denominator]).expand_as(module.weight_denominator))


@torch.no_grad()
def _orthogonal_like_factors(dim: int, alpha: float, beta: float, batch: int, rank: Optional[int], device, dtype):
    """Factors (L, R) with L @ R ~= A = alpha Z + beta I, Z uniform with variance 1 / dim, per batch entry.

    L = U sqrt(S) and R = sqrt(S) V^T from the SVD A = U S V^T. With ``rank``, only the top-``rank`` singular
    triplets, by a randomised SVD (a KAT-B needs 144 of them: exact SVDs took half a minute on 2 cores). The full
    factorisation goes through the symmetric eigenproblem A^T A = V S^2 V^T, about twice as fast as an SVD:
    R = S^(1/2) V^T and L = A V S^(-1/2) (= U S^(1/2)).
    """
    bound = math.sqrt(3.0 / dim)
    a = torch.empty(batch, dim, dim, device=device, dtype=torch.float32).uniform_(-bound, bound).mul_(alpha)
    a.diagonal(dim1=-2, dim2=-1).add_(beta)
    if rank is None:
        eigenvalues, v = torch.linalg.eigh(a.transpose(-2, -1) @ a)
        root = eigenvalues.clamp_min(1e-12).pow(0.25).unsqueeze(-2)  # sqrt of the singular values
        left = (a @ v) / root
    else:
        u, s, v = torch.svd_lowrank(a, q=rank, niter=1)
        root = s.sqrt().unsqueeze(-2)
        left = u * root
    return left.to(dtype), (v * root).transpose(-2, -1).to(dtype)


@torch.no_grad()
def mimetic_attention_init_(attn: torch.nn.Module, qk=(0.7, 0.7), vo=(0.4, -0.4)) -> None:
    """Mimetic init (Trockman & Kolter, 2023) of a timm ``Attention``, as used by the released KAT models.

    Per head, W_q^T W_k mimics alpha Z + beta I (qk = (0.7, 0.7)); W_v and W_proj factor alpha Z + beta I with
    vo = (0.4, -0.4). Drawn from torch's global RNG, so ``torch.manual_seed`` makes it reproducible.
    """
    weight = attn.qkv.weight
    if weight.is_meta:
        return
    dim = weight.shape[1]
    heads = attn.num_heads
    head_dim = dim // heads
    left, right = _orthogonal_like_factors(dim, qk[0], qk[1], heads, head_dim, weight.device, weight.dtype)
    # Head h: query rows = (U sqrt S)[:, :head_dim]^T, key rows = (sqrt S V^T)[:head_dim].
    weight[:dim].copy_(left.transpose(-2, -1).reshape(dim, dim))
    weight[dim : 2 * dim].copy_(right.reshape(dim, dim))
    v_left, v_right = _orthogonal_like_factors(dim, vo[0], vo[1], 1, None, weight.device, weight.dtype)
    weight[2 * dim :].copy_(v_left[0])
    attn.proj.weight.copy_(v_right[0])


class KAT(VisionTransformer):
    """Vision Transformer with group-rational KAN blocks (KAT).

    Takes every argument of timm's ``VisionTransformer`` (img_size, patch_size, embed_dim, depth, num_heads,
    num_classes, global_pool, drop_path_rate, dynamic_img_size, ...) plus:

    Args:
        act_init: init of each block's act2 (a name of the rational table; "swish" for the released models).
        num_groups: channel groups of the rational activations (8 in all released models).
        attn_init: "mimetic" (the released models') or "timm" (timm's default ViT init of the attention).
        weight_init: timm's ViT weight init mode; the KAN blocks always get the variance-preserving init.
    """

    def __init__(
        self,
        act_init: str = "swish",
        num_groups: int = 8,
        attn_init: str = "mimetic",
        weight_init: str = "",
        **kwargs: Any,
    ):
        if "mlp_layer" in kwargs:
            raise TypeError("KAT builds its own mlp_layer (kat_timm.layers.KAN); use VisionTransformer for others")
        if attn_init not in ATTN_INITS:
            raise ValueError(f"attn_init={attn_init!r} is not one of {ATTN_INITS}")
        embed_dim, mlp_ratio = kwargs.get("embed_dim", 768), kwargs.get("mlp_ratio", 4.0)  # timm's ViT defaults
        if isinstance(embed_dim, int) and isinstance(mlp_ratio, (int, float)):  # else timm's ViT names the problem
            # Named in the model's own terms here; the KAN blocks would name their in/hidden features.
            check_num_groups(num_groups, "KAT", embed_dim=embed_dim, mlp_hidden_width=int(embed_dim * mlp_ratio))
        # Initialise once, below, after the attributes init_weights needs are set.
        super().__init__(mlp_layer=partial(KAN, act_init=act_init, num_groups=num_groups), weight_init="skip", **kwargs)
        self.act_init = act_init
        self.num_groups = num_groups
        self.attn_init = attn_init
        self.weight_init_mode = "reset" if weight_init == "skip" else weight_init
        if weight_init != "skip":
            self.init_weights(needs_reset=False)
        self.register_load_state_dict_pre_hook(_complete_vit_state_dict)

    @torch.jit.ignore()
    def load_pretrained(self, checkpoint_path: str, prefix: str = "") -> None:
        """Load a ViT .npz (big_vision / AugReg) checkpoint (timm's ``--initial-checkpoint vit.npz`` route); the
        rationals are then set to act1 = identity, act2 = GELU fit, so the KAT starts as the ViT's function."""
        super().load_pretrained(checkpoint_path, prefix)
        set_rationals_for_vit_mlp_(self)

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        """timm's ViT init (which calls each KAN block's variance-preserving ``init_weights``), then mimetic
        attention when ``attn_init == "mimetic"``, then timm's ``fix_init`` rescaling when enabled. (timm's
        ``"reset"`` mode calls ``reset_parameters()``, which for a KAN block is the same variance-preserving init.)
        """
        # fix_init rescales attn.proj, which the mimetic init below overwrites: apply it last, once.
        fix_init, self.fix_init = self.fix_init, False
        try:
            super().init_weights(mode, needs_reset)
        finally:
            self.fix_init = fix_init
        if self.attn_init == "mimetic":
            # One LAPACK thread: its multi-threaded SVD is slower here even on an idle 2-core machine, and a
            # busy one made building KAT-B take minutes instead of seconds.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for block in self.blocks:
                    mimetic_attention_init_(block.attn)
            finally:
                torch.set_num_threads(threads)
        if self.fix_init:
            self.fix_init_weight()

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """timm's ViT exemptions plus every rational coefficient (the released recipe decayed them)."""
        rational = {name for name, _ in self.named_parameters() if name.endswith(RATIONAL_PARAMETERS)}
        return set(super().no_weight_decay()) | rational


def _complete_vit_state_dict(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: a ViT state dict (KAN-shaped fc1/fc2 but no rational coefficients at all) gets
    function-preserving rationals (act1 identity, act2 GELU fit), so ``--initial-checkpoint vit.pth`` works."""
    if any(k.startswith(prefix) and k.endswith(RATIONAL_PARAMETERS) for k in state_dict):
        return
    completed = vit_state_dict_to_kat(state_dict, module.num_groups, prefix)
    if len(completed) > len(state_dict):
        _logger.info("Loading ViT weights into a KAT: act1 = identity, act2 = GELU fit (function-preserving)")
        state_dict.update(completed)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: KAT, **kwargs) -> Dict[str, torch.Tensor]:
    """Adapt a KAT checkpoint to ``model``: unwrap training checkpoints (EMA weights first, as timm does for
    files) and drop ``module.`` / ``_orig_mod.`` prefixes (``kat_timm.checkpoint.unwrap_state_dict``), then apply timm's
    ViT filter (resamples position and patch embeddings for another img_size or patch size).

    Raises:
        RuntimeError: some, but not all, rational coefficients are missing. (timm loads non-strictly when the
            head is replaced, which would silently keep their init; none at all is a ViT, completed by a hook.)
        CheckpointError: integer or bool tensors for floating-point weights (``kat_timm.checkpoint.check_floating``).
    """
    state_dict, _ = unwrap_state_dict(state_dict)  # the same unwrapping as scripts/convert_checkpoint.py
    check_floating(state_dict, model)
    rational = [k for k in model.state_dict() if k.endswith(RATIONAL_PARAMETERS)]
    missing = [k for k in rational if k not in state_dict]
    if missing and len(missing) < len(rational):
        raise RuntimeError(
            f"KAT checkpoint is missing {len(missing)} of {len(rational)} rational coefficient tensors: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )
    return vit_checkpoint_filter_fn(state_dict, model, **kwargs)


def _create_kat(variant: str, pretrained: bool = False, **kwargs) -> KAT:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        KAT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(hf_hub_id: Optional[str] = None, **kwargs) -> Dict[str, Any]:
    return {
        "hf_hub_id": hf_hub_id,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "mit",
        "paper_ids": "arXiv:2409.10594",
        "paper_name": "Kolmogorov-Arnold Transformer",
        **kwargs,
    }


def _released_cfgs(name: str, size: str) -> Dict[str, Dict[str, Any]]:
    """Default tag (trained from scratch) and ``.vitft`` (started from an AugReg ViT) of one released model."""
    repo = f"adamdad/kat_{size}_patch16_224"
    return {
        name: _cfg(hf_hub_id=repo),
        f"{name}.vitft": _cfg(hf_hub_id=f"{repo}.vitft"),
    }


SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}

default_cfgs = generate_default_cfgs(
    {
        **{k: v for size in SIZES for k, v in _released_cfgs(f"kat_{size}_patch16_224", size).items()},
        # The released models are swish-initialised: the explicit _swish_ names load the same weights.
        **{k: v for size in SIZES for k, v in _released_cfgs(f"kat_{size}_swish_patch16_224", size).items()},
        **{f"kat_{size}_gelu_patch16_224": _cfg() for size in SIZES},
        # Short names: entry points of their own (not deprecations, which warn at every use).
        **{k: v for size in SIZES for k, v in _released_cfgs(f"kat_{size}", size).items()},
    }
)


def _kat(size: str, variant: str, pretrained: bool, **kwargs) -> KAT:
    model_args = dict(patch_size=16, act_init="swish", **SIZES[size])
    return _create_kat(variant, pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def kat_tiny_patch16_224(pretrained: bool = False, **kwargs) -> KAT:
    """KAT-Tiny (KAT-T), 192 wide, 12 blocks, 3 heads; act2 swish-initialised."""
    return _kat("tiny", "kat_tiny_patch16_224", pretrained, **kwargs)


@register_model
def kat_small_patch16_224(pretrained: bool = False, **kwargs) -> KAT:
    """KAT-Small (KAT-S), 384 wide, 12 blocks, 6 heads; act2 swish-initialised."""
    return _kat("small", "kat_small_patch16_224", pretrained, **kwargs)


@register_model
def kat_base_patch16_224(pretrained: bool = False, **kwargs) -> KAT:
    """KAT-Base (KAT-B), 768 wide, 12 blocks, 12 heads; act2 swish-initialised."""
    return _kat("base", "kat_base_patch16_224", pretrained, **kwargs)


@register_model
def kat_tiny_swish_patch16_224(pretrained: bool = False, **kwargs) -> KAT:
    """KAT-T with act2 swish-initialised (the released configuration, explicit name)."""
    return _kat("tiny", "kat_tiny_swish_patch16_224", pretrained, **kwargs)


@register_model
def kat_small_swish_patch16_224(pretrained: bool = False, **kwargs) -> KAT:
    """KAT-S with act2 swish-initialised (the released configuration, explicit name)."""
    return _kat("small", "kat_small_swish_patch16_224", pretrained, **kwargs)


@register_model
def kat_base_swish_patch16_224(pretrained: bool = False, **kwargs) -> KAT:
    """KAT-B with act2 swish-initialised (the released configuration, explicit name)."""
    return _kat("base", "kat_base_swish_patch16_224", pretrained, **kwargs)


@register_model
def kat_tiny_gelu_patch16_224(pretrained: bool = False, **kwargs) -> KAT:
    """KAT-T with act2 GELU-initialised (no released weights)."""
    return _kat("tiny", "kat_tiny_gelu_patch16_224", pretrained, **dict(dict(act_init="gelu"), **kwargs))


@register_model
def kat_small_gelu_patch16_224(pretrained: bool = False, **kwargs) -> KAT:
    """KAT-S with act2 GELU-initialised (no released weights)."""
    return _kat("small", "kat_small_gelu_patch16_224", pretrained, **dict(dict(act_init="gelu"), **kwargs))


@register_model
def kat_base_gelu_patch16_224(pretrained: bool = False, **kwargs) -> KAT:
    """KAT-B with act2 GELU-initialised (no released weights)."""
    return _kat("base", "kat_base_gelu_patch16_224", pretrained, **dict(dict(act_init="gelu"), **kwargs))


@register_model
def kat_tiny(pretrained: bool = False, **kwargs) -> KAT:
    """Short name of kat_tiny_patch16_224 (same model, same pretrained tags)."""
    return _kat("tiny", "kat_tiny", pretrained, **kwargs)


@register_model
def kat_small(pretrained: bool = False, **kwargs) -> KAT:
    """Short name of kat_small_patch16_224 (same model, same pretrained tags)."""
    return _kat("small", "kat_small", pretrained, **kwargs)


@register_model
def kat_base(pretrained: bool = False, **kwargs) -> KAT:
    """Short name of kat_base_patch16_224 (same model, same pretrained tags)."""
    return _kat("base", "kat_base", pretrained, **kwargs)
