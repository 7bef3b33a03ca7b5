#!/usr/bin/env python
"""Convert a KAT checkpoint into a Hugging Face Hub-ready folder for timm and transformers: ``kat-timm publish``
under its older name (one code path; README, "Publish")."""
from __future__ import annotations

import sys
from typing import List, Optional

from kat_timm.cli import publish


def main(argv: Optional[List[str]] = None) -> int:
    """``kat-timm publish`` with this script's name in its messages."""
    return publish.main(argv, prog="convert_checkpoint.py")


if __name__ == "__main__":
    sys.exit(main())
