#!/usr/bin/env bash
# Every check that needs a GPU, in one command sized for one device call (README.md here
# gives the exact call). The checkout is imported from this folder (PYTHONPATH), not
# pip-installed, so the machine's torch stays as it is. Results go to $OUT, the folder the
# device tool brings back; arguments pass through to run.py (--dry-run, --only, ...).
set -u
cd "$(dirname "$0")/../.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m benchmarks.gpu.run --out "${OUT:-/tmp/semclust-gpu-out}" "$@"
