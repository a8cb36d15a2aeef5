#!/usr/bin/env bash
# N processes on this host over CPU devices, joined by jax.distributed (CPU collectives over gloo):
# a smoke test of the multi-host launchers without a cluster.
#
#   launch/local.sh [--processes=2] [--devices_per_process=4] [--port=12355] [--dry_run] \
#       -- train --config=configs/default.py --workdir=runs/local [--config.FIELD=VALUE ...]
#
# Run from the repository root. Every process runs the same vdit command with
# --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I, JAX_PLATFORMS=cpu and
# XLA_FLAGS=--xla_force_host_platform_device_count=D. Logs: WORKDIR/logs/process_I.log; process 0's
# is streamed here. When a process fails, the others are stopped (a peer would otherwise wait on
# it forever) and its exit status is this script's. First, launch/fit.py estimates the step's
# memory per device against this host's available memory shared by all N x D devices.
source "$(dirname "$0")/common.sh"

USAGE="launch/local.sh [--processes=N] [--devices_per_process=D] [--port=PORT] [--skip_fit_check] [--dry_run] -- train --config=... --workdir=DIR [...]"
parse_args "$USAGE" processes devices_per_process port skip_fit_check! -- "$@"
[[ -f launch/fit.py ]] || die "run from the repository root (launch/fit.py not found)"
N="${FLAG_processes:-2}"
D="${FLAG_devices_per_process:-4}"
PORT="${FLAG_port:-12355}"
[[ "$N" =~ ^[1-9][0-9]*$ ]] || die "--processes=$N: expected a positive integer"
[[ "$D" =~ ^[1-9][0-9]*$ ]] || die "--devices_per_process=$D: expected a positive integer"
WORKDIR="$(vdit_flag workdir)" || die "the vdit command needs --workdir=DIR (logs go to DIR/logs)"

((${FLAG_skip_fit_check:-0})) || fit_check --devices=$((N * D)) --memory_gib=host --device_name=CPU

note "$N processes x $D CPU devices, coordinator 127.0.0.1:$PORT; logs in $WORKDIR/logs"
run mkdir -p "$WORKDIR/logs"
PIDS=()
declare -A INDEX
for ((i = 0; i < N; i++)); do
  cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$D"
    "$PYTHON" -m vdit.cli "${VDIT_ARGS[@]}"
    "--coordinator_address=127.0.0.1:$PORT" "--num_processes=$N" "--process_id=$i")
  log="$WORKDIR/logs/process_$i.log"
  if ((DRY_RUN)); then
    echo "$(quote "${cmd[@]}") > $(quote "$log") 2>&1 &"
  else
    echo "+ $(quote "${cmd[@]}") > $(quote "$log") 2>&1 &" >&2
    "${cmd[@]}" >"$log" 2>&1 &
    PIDS+=($!)
    INDEX[$!]=$i
  fi
done
note "process 0's log until it ends"
if ((DRY_RUN)); then
  echo "tail -n +1 -f $(quote "$WORKDIR/logs/process_0.log")"
  exit 0
fi

stop_all() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM
tail -n +1 -f --pid="${PIDS[0]}" "$WORKDIR/logs/process_0.log" &
TAIL=$!
status=0
remaining=("${PIDS[@]}")
while ((${#remaining[@]})); do
  next=()
  for pid in "${remaining[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      next+=("$pid")
    else
      rc=0
      wait "$pid" || rc=$?
      if ((rc != 0 && status == 0)); then
        status=$rc
        echo "local.sh: process ${INDEX[$pid]} (pid $pid) exited with status $rc; stopping the others (see $WORKDIR/logs/process_${INDEX[$pid]}.log)" >&2
        stop_all
      fi
    fi
  done
  remaining=("${next[@]}")
  ((${#remaining[@]})) && sleep 0.5
done
wait "$TAIL" 2>/dev/null || true
exit "$status"
