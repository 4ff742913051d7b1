#!/usr/bin/env bash
# The one command to run on a lent GPU machine, from the repository root (after scripts/gpu_wheels.sh here):
#
#   bash benchmarks/gpu_check.sh            # writes $OUT/gpu_check.json ($OUT: the device call's output folder)
#
# Installs the prepared wheels (trl, datasets and their missing dependencies, from gpu-wheels/) with --no-index
# --no-deps into .gpu-site/ and puts it and the repository on PYTHONPATH, works offline (HF_HUB_OFFLINE=1), and runs
# benchmarks/gpu_check.py, whose import preflight writes the JSON even when an import fails. Extra arguments go to
# gpu_check.py (e.g. --cpu to try the whole path here).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-gpu-wheels}
SITE=$(realpath -m "${GPU_SITE:-.gpu-site}")
OUT_DIR=${OUT:-.}
mkdir -p "$OUT_DIR"
if [ -f "$WHEELS/PINS" ]; then
    # shellcheck disable=SC2046  # the pins are words
    if ! "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" --target "$SITE" \
            $(cat "$WHEELS/PINS") > "$OUT_DIR/gpu_wheels_install.log" 2>&1; then
        echo "gpu_check.sh: installing the wheels of $WHEELS failed (see $OUT_DIR/gpu_wheels_install.log)" >&2
    fi
else
    echo "gpu_check.sh: no $WHEELS/PINS (run scripts/gpu_wheels.sh first); using what is installed" >&2
fi
export PYTHONPATH="$PWD:$PWD/benchmarks:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout 420 "$PYTHON" benchmarks/gpu_check.py --out "$OUT_DIR/gpu_check.json" "$@"
