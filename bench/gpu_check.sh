#!/usr/bin/env bash
# The GPU checks in one command (bench/gpu_check.py): NCCL training through the real trainer, 350M bf16
# tokens/s and MFU at seq 4096 (sdpa, flash-attn when installed), packed == unpacked on the GPU, KD step
# memory at V=65,536. Prints a markdown table to paste into docs/BENCHMARKS.md. Needs one CUDA GPU and the
# repository's Python environment; downloads nothing. Extra arguments go to gpu_check.py (e.g. --peak-tflops 989).
#   bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import flash_attn" 2>/dev/null && echo "flash-attn: installed" || echo "flash-attn: not installed (sdpa only)"
exec timeout 480 python bench/gpu_check.py "$@"
