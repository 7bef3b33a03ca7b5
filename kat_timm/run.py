"""Run any Python script with kat_timm imported first, so the KAT models are in timm's registry.

For timm's scripts without ``--device-modules`` (README, "With timm's train.py and validate.py"); the script runs as
if started with ``python SCRIPT.py ARGS...``.
"""
from __future__ import annotations

import os
import runpy
import sys
from typing import List, Optional

USAGE = "usage: python -m kat_timm.run SCRIPT.py [ARGS...]"


def main(argv: Optional[List[str]] = None) -> int:
    """Import kat_timm, then run ``argv[0]`` as ``__main__`` with the remaining arguments."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__.strip().splitlines()[0]}", file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    script = argv[0]
    if not os.path.isfile(script):
        print(f"kat_timm.run: no such script: {script}\n{USAGE}", file=sys.stderr)
        return 2
    import kat_timm  # noqa: F401  (registers the kat_* models in timm)

    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
