"""``python -m kat_timm COMMAND ...``: the same as the ``kat-timm`` command."""
import sys

from kat_timm.cli import main

sys.exit(main())
