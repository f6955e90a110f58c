#!/usr/bin/env bash
# Accuracy on real MRI: our model vs nnU-Net v2 (2d, CPU) on the same folds, the same per-fold
# training budget and the same metrics code (femur_core.metrics.evaluate). See bench/README.md.
#
#   bash bench/accuracy/run.sh [--folds K] [--budget-minutes B] [--data DIR] [--skip-peer]
#
# Defaults: the real development data (../shared/data/pelvic_mri next to the checkout), K=4, B=30:
# the full protocol, 4 x 30 min x 2 systems = 4 h of training alone. Other options (smoke tests,
# peer settings): --subset N, --work DIR, --results DIR, --peer-tta on|off, --peer-da-workers N,
# --peer-np N, --peer-iters-per-epoch N, --peer-val-iters N; the peer that converges on a CPU:
# --peer-plans cpu --budget-clock cpu --peer-da-workers 0 --ours-ensemble 1 [--peer-budget-minutes B2]
# (see accuracy.py --help and bench/README.md).
# Re-running the same command resumes: finished folds are kept (work folder bench/accuracy/work/).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
DATA="$REPO/../shared/data/pelvic_mri"
SKIP_PEER=0
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --data) DATA="${args[$((i + 1))]:-}" ;;
    --data=*) DATA="${args[$i]#--data=}" ;;
    --skip-peer) SKIP_PEER=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
  esac
done
if [ ! -d "$DATA" ]; then
  echo "skip: the data folder $DATA is absent; the accuracy benchmark needs real scans (pass --data DIR). Nothing was run."
  exit 0
fi
cd "$REPO"
if ! .venv/bin/python -c "import femur_core" 2>/dev/null; then
  bash scripts/setup.sh
fi
if [ "$SKIP_PEER" = 0 ]; then
  t0=$(date +%s)
  bash "$HERE/setup_peer.sh"
  echo "[accuracy] peer set-up: $(( $(date +%s) - t0 )) s" >&2
fi
exec .venv/bin/python "$HERE/accuracy.py" --data "$DATA" "$@"
