#!/usr/bin/env bash
# Issue 14's GPU figures in one command (about 9 minutes on one H100; each section is its own
# process so JAX and PyTorch never hold the GPU's memory at once):
#
#   bash benchmarks/gpu_suite.sh            # on the GPU machine, from the repo root
#   TINY=1 bash benchmarks/gpu_suite.sh     # toy sizes on any machine (CPU smoke test, < 2 min)
#
# Prints: MLLM step MFU (LLaMA-3-shaped PUMA, as many layers as fit, packed paper-mix rows),
# cuDNN vs XLA attention step time, decoder training images/s at 1024x1024 JAX vs diffusers,
# 50-step CFG sample latency JAX bfloat16 vs diffusers float16. Knobs: LAYERS (10), ROWS (4),
# DEC_BATCH (2), OUT (results folder), SECTIONS (default: all).
#
# diffusers (and torch) may be missing on the GPU machine, which has no network. Carry wheels:
# on a machine with network, from the repo root,
#   pip download --only-binary=:all: -d .whl diffusers==0.42.1 huggingface_hub safetensors
# (.whl/ is git-ignored; pass it along with the working tree, e.g. the device runner's `carry`
# argument ".whl"), and this script installs them from there with --no-index when the import
# fails. Without them the PyTorch sections are skipped and the report says so.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$(mktemp -d /tmp/gpu_suite.XXXXXX)}"
TINY_FLAG=""
if [ "${TINY:-0}" = "1" ]; then TINY_FLAG="--tiny"; fi
SECTIONS="${SECTIONS:-mllm decoder_jax decoder_torch sample_jax sample_torch}"
# JAX takes 75% of GPU memory up front by default; each section is alone on the GPU, so let the
# JAX ones take what they need.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"

have_diffusers() { python -c "import diffusers, torch" >/dev/null 2>&1; }
if ! have_diffusers && [ -d .whl ]; then
  echo "diffusers/torch missing: installing the carried wheels from .whl/"
  python -m pip install -q --no-index --find-links .whl diffusers torch 2>&1 | tail -3
fi

for s in $SECTIONS; do
  case "$s" in
    *_torch)
      if ! have_diffusers; then echo "$s: skipped (diffusers/torch not importable)"; continue; fi
      ;;
  esac
  echo "--- $s"
  python -m benchmarks.gpu_suite "$s" --out="$OUT" $TINY_FLAG || echo "$s: FAILED (rc $?)"
done
python -m benchmarks.gpu_suite report --out="$OUT"
echo "(results: $OUT)"
