#!/usr/bin/env python
"""``kat-validate`` (``kat_timm.cli.validate``) as a script: top-1, top-5 and loss of a model on an ImageFolder split
(README, "kat-train and kat-validate"; ``--help`` lists every option)."""
import sys

from kat_timm.cli.validate import main

if __name__ == "__main__":
    sys.exit(main(prog="validate.py"))
