#!/usr/bin/env bash
# The study's 3D U-Net on a CUDA GPU (at most 10 minutes): 48x256x256 inference (study: 5 s on a
# P100), one study-3d training epoch on synthetic study-geometry scans (study: 7 min), bf16
# correctness. Writes bench/results/gpu-<date>.json. Skips (exit 0) where there is no CUDA.
#
#   bash bench/gpu.sh [--subjects 8] [--out bench/results]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "skip: no CUDA device here (or no torch); bench/gpu.sh measures the study's 3D U-Net on a GPU and ran nothing."
  exit 0
fi
exec timeout 600 "$PY" bench/gpu.py "$@"
