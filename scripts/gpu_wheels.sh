#!/usr/bin/env bash
# Prepare, on this machine, the wheels the GPU machine lacks (it has torch, transformers, peft, accelerate, pandas,
# scipy, pyarrow and safetensors, but not trl or datasets, and it cannot reach PyPI): trl, datasets and the
# dependencies of theirs it does not have, at the versions this venv runs, for each CPython in $GPU_PYTHONS, into
# $GPU_WHEELS (git-ignored; it travels with the working tree). Fails if they weigh more than 64 MiB, the most a
# device call carries. benchmarks/gpu_check.sh installs them there with --no-index --no-deps.
#
#   bash scripts/gpu_wheels.sh            # or: make gpu-wheels
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DEST=${GPU_WHEELS:-gpu-wheels}
PYTHONS=${GPU_PYTHONS:-"3.11 3.12 3.13"}  # trl 1.16 needs >= 3.11
LIMIT_MIB=64
PACKAGES="trl datasets dill multiprocess xxhash"

pins=$("$PYTHON" - "$PACKAGES" <<'PY'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1].split()))
PY
)
rm -rf "$DEST"
mkdir -p "$DEST"
for py in $PYTHONS; do
    # binary wheels only, for that interpreter on manylinux x86_64; no dependency resolution (we name them all)
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" --python-version "$py" \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any $pins
done
echo "$pins" > "$DEST/PINS"
bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
mib=$(( (bytes + 1048575) / 1048576 ))
echo "gpu_wheels: $(ls "$DEST"/*.whl | wc -l) wheels, $mib MiB in $DEST ($pins)"
if (( bytes > LIMIT_MIB * 1048576 )); then
    echo "gpu_wheels: $mib MiB is over the $LIMIT_MIB MiB a device call carries" >&2
    exit 1
fi
