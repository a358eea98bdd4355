#!/usr/bin/env bash
# The main job on the embedded defaults: a study pushed into PACS (Orthanc) is routed to
# the Dafne node, segmented with the bundled model, and the DICOM-SEG lands in the same
# study in PACS. Every command is printed so you can repeat it by hand.
#
# Orthanc listens on every interface, so the demo runs inside a private network
# namespace (loopback only): run it as root (or with sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

WORK="${DAFNE_DEMO_DIR:-$(mktemp -d /tmp/dafne-demo.XXXXXX)}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
exec $SUDO unshare -n sh -c 'ip link set lo up && exec "$0" deploy/demo.py "$1"' \
  "$PWD/.venv/bin/python" "$WORK"
