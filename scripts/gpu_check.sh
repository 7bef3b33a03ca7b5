#!/usr/bin/env bash
# The one prepared call for a lent GPU: scripts/gpu_check.py (its docstring says what it measures) under the python
# that has torch ($PYTHON, default python3), with this checkout first on the import path.
#
#   scripts/gpu_check.sh OUTDIR                     # on the GPU machine (about 270 s; --budget SECONDS to change it)
#   scripts/gpu_check.sh --dry-run OUTDIR           # the same steps at tiny sizes on the CPU (what CI runs)
#   scripts/gpu_check.sh --help
# How to call it on the device machine, and which wheel to carry there: scripts/README.md, "GPU, measured".
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
command -v "$py" > /dev/null || { echo "gpu_check: no python '$py' here; set PYTHON=/path/to/python3" >&2; exit 2; }
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$py" "$root/scripts/gpu_check.py" "$@"
