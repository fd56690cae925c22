#!/usr/bin/env bash
# Install dtsweep and everything it needs.
#   bash scripts/install.sh         # the package (what `python -m dtsweep` needs)
#   bash scripts/install.sh test    # + the test dependencies
# On a machine without an NVIDIA driver, torch is pinned to the CPU build
# (constraints/cpu.txt) so pip does not pull several GB of CUDA packages; on a GPU
# machine torch is not capped.
set -euo pipefail
cd "$(dirname "$0")/.."
pip_args=(--disable-pip-version-check)
if ! command -v nvidia-smi >/dev/null 2>&1; then
  pip_args+=(-c constraints/cpu.txt)
fi
extra=""
if [ "${1:-}" = "test" ]; then extra="[test]"; fi
python -m pip install "${pip_args[@]}" -e ".${extra}"
