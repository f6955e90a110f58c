#!/usr/bin/env bash
# napari's event loop while Train Fold trains for about a minute, in a real viewer on a virtual X server.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
export QT_QPA_PLATFORM=xcb QT_API="${QT_API:-pyqt6}"
exec xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python bench/responsiveness.py "$@"
