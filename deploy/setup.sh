#!/usr/bin/env bash
# Set up Dafne Node on a fresh Debian machine: system tools, then a Python venv.
#
#   bash deploy/setup.sh        (as root, or with sudo available)
#
# Installs dcmtk (DICOM modality tools), Orthanc (the PACS used in tests and the
# demo) and dicom3tools (dciodvfy, the DICOM validator), creates .venv and
# installs the project with its test dependencies, then the npm packages of the
# JavaScript SEG writers in tests/harness/seg_writers (needs Node.js >= 20.6 and npm).
# Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need_apt=0
for tool in storescu echoscu Orthanc dciodvfy; do
  if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then need_apt=1; fi
done
if [ "$need_apt" -eq 1 ]; then
  echo "setup: installing dcmtk, orthanc and dicom3tools with apt-get"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends \
    dcmtk orthanc dicom3tools >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
# torch is pinned to 2.13.0 in pyproject.toml: pip takes the CPU wheel on this disk.
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true

# The JavaScript DICOM-SEG writers the tests drive (dcmjs, OHIF's Cornerstone adapter),
# pinned by their package-lock.json; installed again only when the lock changes.
writers=tests/harness/seg_writers
if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
  echo "setup: node and npm (Node.js >= 20.6) are needed for $writers; install them first" >&2
  exit 1
fi
# write_cornerstone.mjs registers an ES module resolve hook (module.register, Node 20.6).
recent_node='const [major, minor] = process.versions.node.split(".").map(Number);
process.exit(major > 20 || (major === 20 && minor >= 6) ? 0 : 1);'
if ! node -e "$recent_node"; then
  echo "setup: Node.js $(node --version) is too old for $writers; 20.6 or newer is needed" >&2
  exit 1
fi
lock_sum=$(sha256sum "$writers/package-lock.json" | cut -d' ' -f1)
stamp="$writers/node_modules/.installed-lock.sha256"
if [ "$(cat "$stamp" 2>/dev/null)" != "$lock_sum" ]; then
  echo "setup: installing the JavaScript SEG writers (npm ci in $writers)"
  (cd "$writers" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  echo "$lock_sum" > "$stamp"
fi

.venv/bin/python -c "import dafne_node, torch; print('setup: dafne-node ready, torch', torch.__version__)"
