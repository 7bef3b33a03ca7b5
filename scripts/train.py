#!/usr/bin/env python
"""``kat-train`` (``kat_timm.cli.train``) as a script, torchrun included: timm train.py's options and YAML configs
(README, "kat-train and kat-validate"; ``--help`` lists every option)."""
import sys

from kat_timm.cli.train import main

if __name__ == "__main__":
    sys.exit(main(prog="train.py"))
