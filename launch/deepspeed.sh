#!/usr/bin/env bash
# The DeepSpeed launcher: one node (NUM_GPUS) or every host of a hostfile (started over pdsh/ssh by
# DeepSpeed). Use a ZeRO backend: distributed=zero1|zero2|zero3 (or a recipe that sets one).
#
#   HOSTFILE=launch/hostfile launch/deepspeed.sh recipe=lfm2-2.6b/pretrain distributed=zero3 data.path=/shared/mix
#   NUM_GPUS=8 launch/deepspeed.sh stage=sft distributed=zero2 ...          # one node, no hostfile
#
# Hostfile format (DeepSpeed's): one `<host> slots=<GPUs>` per line, `#` comments allowed:
#   node0 slots=8
#   node1 slots=8
# Environment:
#   HOSTFILE     hostfile path (default: ./hostfile if it exists, else one node)
#   NUM_GPUS     one node without hostfile: GPUs to use (default: all)
#   MASTER_ADDR  rank-0 host (default: the first host of the hostfile)
#   MASTER_PORT  default 29500
#   INCLUDE / EXCLUDE  DeepSpeed --include / --exclude host:slot filters
#   DS_LAUNCHER  DeepSpeed --launcher (pdsh | openmpi | mvapich | slurm ...; default DeepSpeed's: pdsh)
#   RUN_DIR      run directory (default outputs/launch/<timestamp>, taken once here so all hosts agree)
#   DEEPSPEED    launcher command (default "deepspeed")
#   DRY_RUN=1    print the command (after validating the hostfile) and exit
#
# `--no_local_rank` keeps DeepSpeed from appending `--local_rank=N`, which Hydra would reject; the processes
# read LOCAL_RANK from the environment. `--module` runs `python -m lfm2_train`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

if [ -z "${HOSTFILE:-}" ] && [ -f hostfile ]; then HOSTFILE=hostfile; fi
ds=()
if [ -n "${HOSTFILE:-}" ]; then
  [ -f "$HOSTFILE" ] || lfm2_die "HOSTFILE=$HOSTFILE does not exist"
  hosts=0 slots=0 first=""
  lineno=0
  while IFS= read -r line || [ -n "$line" ]; do
    lineno=$((lineno + 1))
    line=${line%%#*}
    [[ $line =~ ^[[:space:]]*$ ]] && continue
    if [[ $line =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=([1-9][0-9]*)[[:space:]]*$ ]]; then
      hosts=$((hosts + 1)); slots=$((slots + BASH_REMATCH[2]))
      [ -n "$first" ] || first=${BASH_REMATCH[1]}
    else
      lfm2_die "$HOSTFILE line $lineno: expected '<host> slots=<n>', got '$line'"
    fi
  done < "$HOSTFILE"
  [ "$hosts" -gt 0 ] || lfm2_die "$HOSTFILE lists no hosts"
  ds+=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:-$first}" --master_port "${MASTER_PORT:-29500}")
  [ "${DRY_RUN:-0}" = "1" ] && echo "# hostfile $HOSTFILE: $hosts hosts, $slots slots"
else
  NUM_GPUS=${NUM_GPUS:-$(lfm2_gpu_count)}
  [[ $NUM_GPUS =~ ^[1-9][0-9]*$ ]] || lfm2_die "NUM_GPUS=$NUM_GPUS: expected a positive integer"
  ds+=(--num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}")
fi
[ -z "${INCLUDE:-}" ] || ds+=(--include "$INCLUDE")
[ -z "${EXCLUDE:-}" ] || ds+=(--exclude "$EXCLUDE")
[ -z "${DS_LAUNCHER:-}" ] || ds+=(--launcher "$DS_LAUNCHER")
lfm2_pin_run_dir "outputs/launch/$(date +%Y-%m-%d_%H-%M-%S)" "$@"
read -r -a deepspeed <<< "${DEEPSPEED:-deepspeed}"

launch_or_print "${deepspeed[@]}" "${ds[@]}" --no_local_rank --module lfm2_train "${LFM2_ARGS[@]}"
