# Shared by the launchers (sourced, not run). Every launcher builds one command array and hands it to
# `launch_or_print`, so DRY_RUN=1 prints exactly what would run.

lfm2_die() { echo "$(basename "$0"): $*" >&2; exit 2; }

# Number of local GPUs, 1 without any (a CPU run with gloo: set NPROC/NPROC_PER_NODE yourself).
lfm2_gpu_count() {
  local n=0
  if command -v nvidia-smi >/dev/null 2>&1; then n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
  if [ "${n:-0}" -gt 0 ]; then echo "$n"; else echo 1; fi
}

# lfm2_has_arg KEY ARGS...: is `KEY=...` (or `+KEY=`/`++KEY=`) among the Hydra overrides?
lfm2_has_arg() {
  local key=$1 a; shift
  for a in "$@"; do
    a=${a#++}; a=${a#+}
    [[ $a == "$key="* ]] && return 0
  done
  return 1
}

# lfm2_arg_value KEY ARGS...: the value of the last `KEY=value` override (empty if none).
lfm2_arg_value() {
  local key=$1 a value=""; shift
  for a in "$@"; do
    a=${a#++}; a=${a#+}
    [[ $a == "$key="* ]] && value=${a#"$key="}
  done
  echo "$value"
}

# Every rank must write to the same run directory. Hydra's default (outputs/<date>/<time>) is computed per
# process, so it can differ between ranks (a second boundary) and always differs between nodes; pin it once
# here unless the overrides already do. Sets LFM2_ARGS (the overrides to pass) and LFM2_RUN_DIR.
lfm2_pin_run_dir() {
  local default_dir=$1; shift
  LFM2_ARGS=("$@")
  if lfm2_has_arg hydra.run.dir "$@"; then
    LFM2_RUN_DIR=$(lfm2_arg_value hydra.run.dir "$@")
  elif lfm2_has_arg output_dir "$@"; then
    LFM2_RUN_DIR=$(lfm2_arg_value output_dir "$@")
  else
    LFM2_RUN_DIR=${RUN_DIR:-$default_dir}
    [ -n "$LFM2_RUN_DIR" ] || return 1
    LFM2_ARGS+=("hydra.run.dir=$LFM2_RUN_DIR")
  fi
}

# Run the command, or with DRY_RUN=1 print it (shell-quoted, one line) and exit 0.
launch_or_print() {
  if [ "${DRY_RUN:-0}" = "1" ]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
    return 0
  fi
  exec "$@"
}
