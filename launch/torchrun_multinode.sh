#!/usr/bin/env bash
# Several nodes: run this same script on every node (by hand, pdsh, or srun — see slurm.sbatch).
#
#   NNODES=4 NPROC_PER_NODE=8 MASTER_ADDR=node0 RUN_DIR=/shared/runs/pt1 \
#     launch/torchrun_multinode.sh recipe=lfm2-1.2b/pretrain data.path=/shared/data/mix
#
# Rendezvous: c10d (default) — every node meets at MASTER_ADDR:MASTER_PORT under RDZV_ID and ranks are
# assigned by the rendezvous (no node rank needed, nodes may start in any order). RDZV_BACKEND=static uses
# a fixed NODE_RANK per node instead (MASTER_ADDR must then be node 0).
# Environment (under SLURM the defaults come from the job):
#   NNODES          number of nodes, or MIN:MAX for an elastic range (default $SLURM_NNODES; required)
#   NPROC_PER_NODE  processes per node (default: the number of GPUs, else 1)
#   MASTER_ADDR     rendezvous host, reachable from every node (required)
#   MASTER_PORT     rendezvous port (default 29500)
#   RDZV_ID         run id shared by all nodes (default $SLURM_JOB_ID, else "lfm2_train")
#   RDZV_BACKEND    c10d (default) | static
#   NODE_RANK       static only: this node's rank (default $SLURM_NODEID)
#   MAX_RESTARTS    torchrun worker-group restarts on failure (default 0)
#   RUN_DIR         the run directory, on a filesystem all nodes share (required unless the overrides set
#                   hydra.run.dir= or output_dir=): each node computing its own timestamp would split the run
#   TORCHRUN        launcher command (default "torchrun")
#   DRY_RUN=1       print the command and exit
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

NNODES=${NNODES:-${SLURM_NNODES:-}}
[ -n "$NNODES" ] || lfm2_die "set NNODES (number of nodes, or MIN:MAX)"
[[ $NNODES =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || lfm2_die "NNODES=$NNODES: expected N or MIN:MAX"
NPROC_PER_NODE=${NPROC_PER_NODE:-$(lfm2_gpu_count)}
[[ $NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] || lfm2_die "NPROC_PER_NODE=$NPROC_PER_NODE: expected a positive integer"
[ -n "${MASTER_ADDR:-}" ] || lfm2_die "set MASTER_ADDR (the rendezvous host, reachable from every node)"
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_BACKEND=${RDZV_BACKEND:-c10d}
lfm2_pin_run_dir "" "$@" || lfm2_die "set RUN_DIR (on a shared filesystem) or pass hydra.run.dir=<dir>: every node must write the same run directory"
read -r -a torchrun <<< "${TORCHRUN:-torchrun}"

case $RDZV_BACKEND in
  c10d)
    rdzv=(--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${RDZV_ID:-${SLURM_JOB_ID:-lfm2_train}}")
    ;;
  static)
    NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-}}
    [ -n "$NODE_RANK" ] || lfm2_die "RDZV_BACKEND=static needs NODE_RANK (0 on the MASTER_ADDR node)"
    rdzv=(--node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
    ;;
  *) lfm2_die "RDZV_BACKEND=$RDZV_BACKEND: choose c10d or static" ;;
esac

launch_or_print "${torchrun[@]}" --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" "${rdzv[@]}" \
  --max_restarts "${MAX_RESTARTS:-0}" -m lfm2_train "${LFM2_ARGS[@]}"
