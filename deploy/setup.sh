#!/usr/bin/env bash
# Set up Dafne Node on a fresh Debian machine: system tools, then a Python venv.
#
#   bash deploy/setup.sh        (as root, or with sudo available)
#
# Installs dcmtk (DICOM modality tools), Orthanc (the PACS used in tests and the
# demo) and dicom3tools (dciodvfy, the DICOM validator), creates .venv and
# installs the project with its test dependencies. Safe to run again.
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
.venv/bin/python -c "import dafne_node, torch; print('setup: dafne-node ready, torch', torch.__version__)"
