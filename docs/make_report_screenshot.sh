#!/usr/bin/env bash
# The cohort report of docs/cohort_report.png, on SYNTHETIC data only: a 2-minute model on 10 synthetic
# subjects, predict with --report on 8 others, then a headless Chromium screenshot of the page.
# Needs Debian's chromium (apt-get install -y chromium). Usage: bash docs/make_report_screenshot.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-$(mktemp -d)}
PY=${PYTHON:-.venv/bin/python}
$PY -c "
from femur_core.synthetic import make_cohort
make_cohort('$W/data', n=10, seed=100, geometry='dev', downsample=4)
make_cohort('$W/test', n=8, seed=500, geometry='dev', downsample=4)"
$PY -m femur_core.train --data "$W/data" --out "$W/model" --recipe synthetic-quick --device cpu
$PY -m femur_core.predict "$W/model" "$W/test" --out "$W/pred" --device cpu --mesh --report
chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
  --disable-sync --no-first-run --user-data-dir="$(mktemp -d)" --window-size=1280,1000 \
  --screenshot="$PWD/docs/cohort_report.png" "file://$W/pred/report.html"
