#!/usr/bin/env python
"""Top-1, top-5 and loss of a model on an ImageFolder split: ``kat-validate`` as a script.

Examples::

    python scripts/validate.py --data-dir /data/imagenet --model kat_tiny_patch16_224 --pretrained
    python scripts/validate.py --data-dir /data/flowers --checkpoint output/train/run/model_best.pth.tar --use-ema

The logic lives in ``kat_timm.cli.validate``; ``python scripts/validate.py --help`` lists every option.
"""
import sys

from kat_timm.cli.validate import main

if __name__ == "__main__":
    sys.exit(main(prog="validate.py"))
