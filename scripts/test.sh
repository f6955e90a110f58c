#!/usr/bin/env bash
# Set up, then run the whole test suite (GUI tests under a virtual X server).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Xvfb, and the X libraries Qt 6's xcb platform plugin loads (libxcb-cursor0 is new with Qt 6.5)
if ! command -v xvfb-run >/dev/null 2>&1 || ! ldconfig -p 2>/dev/null | grep -q "libxcb-cursor.so.0"; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xvfb xauth libxcb-icccm4 libxcb-keysyms1 \
    libxcb-image0 libxcb-render-util0 libxcb-xinerama0 libxcb-xkb1 libxkbcommon-x11-0 libxcb-randr0 \
    libxcb-shape0 libxcb-xfixes0 libxcb-cursor0 libgl1 libegl1 libfontconfig1 libdbus-1-3 >/dev/null
fi
# lint first (the rules are in pyproject.toml [tool.ruff]); a finding fails the run
.venv/bin/ruff check src tests bench
export QT_QPA_PLATFORM=xcb
# Qt 6 (PyQt6, what the napari extra installs) even in an older .venv that still holds PyQt5
export QT_API="${QT_API:-pyqt6}"
exec xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python -m pytest -ra "$@"
