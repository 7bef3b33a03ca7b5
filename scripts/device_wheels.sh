#!/usr/bin/env bash
# Prepare, here (where pip reaches PyPI), the wheels a call on the device machine carries: that machine has no
# network and a timm of unknown version, and KAT needs timm >= pyproject.toml's floor. Downloads timm at that floor
# (pure Python; everything it needs is on the device) into .whl/ (ignored by git; never commit it). Then call the
# device tool with carry [".whl"] and a command that begins with the install line this script prints.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
floor=$(sed -n 's/^ *"timm>=\([0-9.]*\)".*/\1/p' "$root/pyproject.toml")
[ -n "$floor" ] || { echo "device_wheels: no timm>= floor in pyproject.toml" >&2; exit 1; }
py=${PYTHON:-python3}
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    -d "$root/.whl" "timm==$floor"
ls -l "$root"/.whl/*.whl
echo "carry: [\".whl\"]; begin the device command with:"
echo "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site" \
    ".whl/*.whl && export PYTHONPATH=/tmp/site || exit;"
