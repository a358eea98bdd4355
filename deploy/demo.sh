#!/usr/bin/env bash
# The main job on the embedded defaults: a synthetic lower-leg MR study is
# segmented by the bundled model and checked against its ground truth.
# Every command is printed before it runs so you can repeat it by hand.
set -euo pipefail
cd "$(dirname "$0")/.."

WORK="${DAFNE_DEMO_DIR:-$(mktemp -d /tmp/dafne-demo.XXXXXX)}"
run() { echo; echo "\$ $*"; "$@"; }

run .venv/bin/dafne-node model show
run .venv/bin/dafne-node phantom --out "$WORK/leg" --site A --seed 7
run .venv/bin/dafne-node segment "$WORK/leg/images" --out "$WORK/leg/dafne.seg.dcm"
run .venv/bin/dafne-node compare "$WORK/leg/dafne.seg.dcm" "$WORK/leg/truth.seg.dcm"
echo
echo "The SEG is $WORK/leg/dafne.seg.dcm: open it with the images in 3D Slicer or any DICOM-SEG viewer."
