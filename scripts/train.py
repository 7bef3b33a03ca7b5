#!/usr/bin/env python
"""Train or fine-tune a timm model (KAT included) on an ImageFolder: ``kat-train`` as a script.

Takes timm train.py's option names and its YAML configs (``-c``). Examples::

    python scripts/train.py -c configs/kat_tiny.yaml --data-dir /data/imagenet
    python scripts/train.py --data-dir /data/flowers --model kat_tiny_patch16_224 --pretrained --epochs 30
    torchrun --nproc_per_node=8 scripts/train.py -c configs/kat_tiny.yaml --data-dir /data/imagenet

The logic lives in ``kat_timm.cli.train``; ``python scripts/train.py --help`` lists every option.
"""
import sys

from kat_timm.cli.train import main

if __name__ == "__main__":
    sys.exit(main(prog="train.py"))
