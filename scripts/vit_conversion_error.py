#!/usr/bin/env python
"""How far ``kat_from_vit`` moves a ViT's logits, for GELU fits of the init table, as the ViT's fc1 outputs grow.

Trained ViTs' hidden pre-activations (fc1 outputs) reach |x| ~ 10; a timm-initialised ViT's stay under ~1.5. This
script builds the ViT with timm's init (seeded), multiplies every fc1 weight by K and divides every fc2 weight by K
(so the MLP's output keeps its scale while its GELU sees K times larger inputs), converts it with ``kat_from_vit``,
sets act2 to each init named, and prints max |logit difference| and that divided by max |logit| (the "relative"
error the tests bound). Random weights and inputs: the conditions, not a trained model's accuracy. Log of runs:
scripts/README.md, "ViT -> KAT conversion error".
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch
import timm

import kat_timm
from kat_timm.models.kat import set_rationals_for_vit_mlp_


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="a timm ViT with GELU MLPs")
    parser.add_argument("--img-size", type=int, default=64, help="input size (default: 64)")
    parser.add_argument("--batch", type=int, default=8, help="random images per measurement (default: 8)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1, 4, 8, 12], metavar="K",
                        help="fc1 weight multipliers (default: 1 4 8 12)")
    parser.add_argument("--inits", nargs="+", default=["gelu", "gelu_wide"],
                        help="init-table entries to use for act2 (default: gelu gelu_wide)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.img_size < 1 or args.batch < 1 or any(k <= 0 for k in args.scales):
        parser.error("--img-size, --batch and every --scales value must be positive")
    known = kat_timm.layers.rational_inits()
    unknown = [name for name in args.inits if name not in known]
    if unknown:
        parser.error(f"--inits: unknown {', '.join(unknown)}; the table has {', '.join(known)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        timm.create_model(args.model, pretrained=False, img_size=args.img_size, device="meta")
    except (RuntimeError, ValueError, TypeError) as error:
        print(f"error: --model {args.model}: {error}", file=sys.stderr)
        return 2
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {now}, {platform.machine()} {platform.processor() or ''} ({os.cpu_count()} CPUs), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.model} at {args.img_size} px, batch {args.batch}, seed {args.seed}")
    header = "| K | fc1 out std | fc1 out max abs | " + " | ".join(f"{n}: max abs diff (relative)" for n in args.inits)
    print(header + " |")
    print("|---" * (3 + len(args.inits)) + "|")
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(args.seed))
    for k in args.scales:
        torch.manual_seed(args.seed)
        vit = timm.create_model(args.model, img_size=args.img_size).eval()
        outputs = []
        with torch.no_grad():
            for block in vit.blocks:
                block.mlp.fc1.weight.mul_(k)
                block.mlp.fc2.weight.div_(k)
                block.mlp.fc1.register_forward_hook(lambda m, i, out: outputs.append(out.flatten()))
            expected = vit(x)
            hidden = torch.cat(outputs)
            kat = kat_timm.kat_from_vit(vit)  # the hooks are on the ViT's modules, not copied
            cells = []
            for init in args.inits:
                set_rationals_for_vit_mlp_(kat, act2_init=init)
                diff = (kat(x) - expected).abs().max().item()
                cells.append(f"{diff:.2e} ({diff / expected.abs().max().item():.1e})")
        print(f"| {k:g} | {hidden.std():.2f} | {hidden.abs().max():.1f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
