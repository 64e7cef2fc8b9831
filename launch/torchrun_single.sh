#!/usr/bin/env bash
# One node, NPROC processes (one per GPU, or CPU processes with gloo), `torchrun --standalone`.
#
#   NPROC=8 launch/torchrun_single.sh recipe=lfm2-350m/pretrain data.path=/data/mix
#   DRY_RUN=1 launch/torchrun_single.sh stage=sft ...        # print the command instead of running it
#
# Everything after the script name is passed to `python -m lfm2_train` unchanged (Hydra overrides).
# Environment:
#   NPROC      processes on this node (default: the number of GPUs, else 1)
#   RUN_DIR    run directory for every rank (default outputs/launch/<timestamp>, taken once here);
#              ignored when the overrides set hydra.run.dir= or output_dir=. Re-run with the same RUN_DIR
#              to resume (trainer.resume=auto is the default).
#   TORCHRUN   launcher command (default "torchrun"; e.g. "python -m torch.distributed.run")
#   DRY_RUN=1  print the command and exit
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

NPROC=${NPROC:-$(lfm2_gpu_count)}
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || lfm2_die "NPROC=$NPROC: expected a positive integer"
lfm2_pin_run_dir "outputs/launch/$(date +%Y-%m-%d_%H-%M-%S)" "$@"
read -r -a torchrun <<< "${TORCHRUN:-torchrun}"

launch_or_print "${torchrun[@]}" --standalone --nnodes 1 --nproc_per_node "$NPROC" \
  -m lfm2_train "${LFM2_ARGS[@]}"
