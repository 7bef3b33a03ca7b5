"""ViT -> KAT, function-preserving: copy everything a ViT and a KAT share, and set the rationals so that the KAN
computes what the ViT's MLP did (act1 = identity, act2 = the init table's "gelu_wide", GELU fitted on [-10, 10]).

The released ".vitft" recipe loaded ViT weights into a swish-initialised act2, which changes the network's
function at step 0; starting from the GELU fit keeps it, to the error measured in the README ("From a ViT").
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Union

import torch
from torch import nn
from timm.models import VisionTransformer

from .kat import KAT, VIT_ACT2_INIT, set_rationals_for_vit_mlp_, vit_state_dict_to_kat

__all__ = ["kat_from_vit", "vit_state_dict_to_kat", "set_rationals_for_vit_mlp_"]


def _config_from_vit(vit: VisionTransformer) -> Dict[str, Any]:
    block = vit.blocks[0]
    act = getattr(block.mlp, "act", None)
    if not isinstance(act, nn.GELU):
        raise ValueError(
            f"kat_from_vit expects a ViT with GELU MLPs (the GELU fit makes the KAT compute the same function); "
            f"this one uses {type(act).__name__}"
        )
    return dict(
        img_size=vit.patch_embed.img_size,
        patch_size=vit.patch_embed.patch_size,
        in_chans=vit.patch_embed.proj.in_channels,
        num_classes=vit.num_classes,
        global_pool=vit.global_pool,
        embed_dim=vit.embed_dim,
        depth=len(vit.blocks),
        num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / vit.embed_dim,
        qkv_bias=block.attn.qkv.bias is not None,
        class_token=vit.cls_token is not None,
        reg_tokens=vit.num_reg_tokens,
        no_embed_class=vit.no_embed_class,
        pre_norm=not isinstance(vit.norm_pre, nn.Identity),
        fc_norm=not isinstance(vit.fc_norm, nn.Identity),
        dynamic_img_size=vit.dynamic_img_size,
        init_values=1.0 if not isinstance(block.ls1, nn.Identity) else None,
    )


def _config_from_state_dict(state_dict: Mapping[str, torch.Tensor], num_heads) -> Dict[str, Any]:
    try:
        proj = state_dict["patch_embed.proj.weight"]  # (embed_dim, in_chans, p, p)
        pos = state_dict["pos_embed"]  # (1, prefix + grid^2, embed_dim)
    except KeyError as error:
        raise ValueError(f"not a timm ViT state dict: no {error.args[0]!r}") from None
    embed_dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    has_cls = "cls_token" in state_dict
    grid = round((pos.shape[1] - int(has_cls)) ** 0.5)
    head = state_dict.get("head.weight")
    return dict(
        img_size=grid * patch,
        patch_size=patch,
        in_chans=in_chans,
        num_classes=head.shape[0] if head is not None else 0,
        embed_dim=embed_dim,
        depth=depth,
        # timm's ViT-Ti/S/B all use 64-channel heads: the state dict can't tell, so that is the default.
        num_heads=num_heads or embed_dim // 64,
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        class_token=has_cls,
        global_pool="token" if has_cls else "avg",
        fc_norm="fc_norm.weight" in state_dict,
        init_values=1.0 if "blocks.0.ls1.gamma" in state_dict else None,
    )


def kat_from_vit(vit: Union[VisionTransformer, Mapping[str, torch.Tensor]], num_heads=None, **kwargs) -> nn.Module:
    """Build the KAT matching a timm ViT (or a ViT state dict) that computes (almost) the same function.

    Embeddings, attention, norms, head, fc1 and fc2 are copied; act1 is the identity and act2 the GELU fit on
    [-10, 10] (``"gelu_wide"``: fc1 outputs of trained ViTs reach |x| ~ 10).

    Args:
        vit: a timm ``VisionTransformer`` with GELU MLPs, or its state dict.
        num_heads: attention heads, only for a state dict (default: embed_dim // 64, as in ViT-Ti/S/B).
        **kwargs: overrides of the KAT's constructor arguments (e.g. ``drop_path_rate``, ``num_groups``).

    Returns:
        A ``kat_timm.models.KAT`` in eval mode if ``vit`` was, on the ViT's device and dtype.

    Raises:
        ValueError: the ViT doesn't use GELU, or its weights don't fit the KAT (the message names the keys).
    """
    if isinstance(vit, VisionTransformer):
        config, state_dict = _config_from_vit(vit), vit.state_dict()
        reference = next(vit.parameters())
        device, dtype, training = reference.device, reference.dtype, vit.training
    elif isinstance(vit, Mapping):
        config, state_dict = _config_from_state_dict(vit, num_heads), vit
        device, dtype, training = torch.device("cpu"), None, True
    else:
        raise TypeError(f"kat_from_vit takes a timm VisionTransformer or its state dict, got {type(vit).__name__}")
    config.update(act_init=VIT_ACT2_INIT, **kwargs)
    kat = KAT(**config)
    missing, unexpected = kat.load_state_dict(vit_state_dict_to_kat(state_dict, kat.num_groups), strict=False)
    if missing or unexpected:
        raise ValueError(f"ViT weights don't fit the KAT: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    set_rationals_for_vit_mlp_(kat)
    return kat.to(device=device, dtype=dtype).train(training)
