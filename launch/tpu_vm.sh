#!/usr/bin/env bash
# A run on a Cloud TPU VM slice: create (or reuse) it, put the code on every worker, run the same
# vdit command on all workers at once, stream worker 0's log, delete on request.
#
#   launch/tpu_vm.sh --name=NAME --zone=ZONE --accelerator=v5p-32 [--project=P] [--version=RUNTIME]
#       [--queued] [--spot] [--nfs=HOST:/EXPORT] [--code=copy|GIT_URL] [--delete] [--dry_run] \
#       -- train --config=configs/default.py:B/2 --workdir=/mnt/shared/runs/b2 [--config.FIELD=VALUE ...]
#
# Run from the repository root (with gcloud authenticated). Steps:
#  1. launch/fit.py compiles the train step for the slice (`vdit compile --topology=ACCELERATOR`,
#     libtpu on this machine, no TPU) and stops here, naming the bytes, if it does not fit in HBM;
#  2. the TPU VM NAME is reused when it exists, else created (`--queued`: as a queued resource,
#     waited for until ACTIVE; `--spot`: Spot capacity);
#  3. the code on every worker: `--code=copy` (default) copies `git archive HEAD` of this checkout,
#     `--code=URL` clones it; then a venv with `pip install -e .[tpu]`; `--nfs` mounts a shared
#     file system (Filestore) at /mnt/shared on every worker: the work directory must be one every
#     worker sees;
#  4. the vdit command starts on all workers at once, detached (an ssh drop does not stop it),
#     logging to ~/vdit.log on each worker; JAX finds the slice's workers itself;
#  5. worker 0's log is streamed until the run ends; `--delete` then deletes the VM (or the queued
#     resource).
# After a preemption run the same command again: the VM is recreated and `vdit train` resumes
# from the latest checkpoint in the work directory.
source "$(dirname "$0")/common.sh"

USAGE="launch/tpu_vm.sh --name=NAME --zone=ZONE --accelerator=TYPE [--project=P] [--version=V] [--queued] [--spot] [--nfs=HOST:/EXPORT] [--code=copy|URL] [--delete] [--skip_fit_check] [--dry_run] -- train --config=... --workdir=DIR [...]"
parse_args "$USAGE" name zone accelerator project version queued! spot! nfs code delete! skip_fit_check! -- "$@"
need name zone accelerator
[[ -f launch/fit.py ]] || die "run from the repository root (launch/fit.py not found)"
NAME="$FLAG_name"
ACC="$FLAG_accelerator"
CODE="${FLAG_code:-copy}"
vdit_flag workdir >/dev/null || die "the vdit command needs --workdir=DIR (on a file system every worker sees)"

# TPU software versions by generation (Cloud TPU "TPU software versions"); --version overrides.
case "$ACC" in
  v4-*) VERSION_DEFAULT=tpu-ubuntu2204-base ;;
  v5litepod-* | v5e-*) VERSION_DEFAULT=v2-alpha-tpuv5-lite ;;
  v5p-*) VERSION_DEFAULT=v2-alpha-tpuv5 ;;
  v6e-*) VERSION_DEFAULT=v2-alpha-tpuv6e ;;
  *) die "--accelerator=$ACC: expected v4-N, v5litepod-N, v5p-N or v6e-N" ;;
esac
VERSION="${FLAG_version:-$VERSION_DEFAULT}"
WHERE=(--zone="$FLAG_zone")
[[ -n "${FLAG_project:-}" ]] && WHERE+=(--project="$FLAG_project")
SPOT=()
((${FLAG_spot:-0})) && SPOT=(--spot)
ssh_all() { run gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" --worker=all --command="$1"; }

((${FLAG_skip_fit_check:-0})) || fit_check --topology="${ACC/v5e-/v5litepod-}"

note "the TPU VM $NAME: reused when it exists, else created"
exists=0
if ((DRY_RUN)); then
  quote gcloud compute tpus tpu-vm describe "$NAME" "${WHERE[@]}" --format=value\(state\)
elif gcloud compute tpus tpu-vm describe "$NAME" "${WHERE[@]}" --format='value(state)' >/dev/null 2>&1; then
  exists=1
  note "reusing $NAME"
fi
if ((!exists)); then
  if ((${FLAG_queued:-0})); then
    run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${WHERE[@]}" \
      --accelerator-type="$ACC" --runtime-version="$VERSION" "${SPOT[@]}"
    note "wait until the queued resource is ACTIVE"
    if ((DRY_RUN)); then
      quote gcloud compute tpus queued-resources describe "$NAME" "${WHERE[@]}" --format=value\(state.state\)
    else
      while :; do
        state="$(gcloud compute tpus queued-resources describe "$NAME" "${WHERE[@]}" --format='value(state.state)')"
        [[ "$state" == ACTIVE ]] && break
        [[ "$state" == FAILED || "$state" == SUSPENDED ]] && die "queued resource $NAME is $state"
        echo "queued resource $NAME: $state" >&2
        sleep 60
      done
    fi
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${WHERE[@]}" --accelerator-type="$ACC" \
      --version="$VERSION" "${SPOT[@]}"
  fi
fi

note "the code and its environment on every worker"
if [[ "$CODE" == copy ]]; then
  TARBALL="/tmp/vdit-code-$NAME.tar.gz"
  run git archive --format=tar.gz --output="$TARBALL" HEAD
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:vdit-code.tar.gz" "${WHERE[@]}" --worker=all
  FETCH="mkdir -p ~/vdit && tar -xzf ~/vdit-code.tar.gz -C ~/vdit"
else
  FETCH="(test -d ~/vdit/.git && git -C ~/vdit pull --ff-only) || git clone $(quote "$CODE") ~/vdit"
fi
ssh_all "$FETCH && cd ~/vdit && (test -d .venv || python3 -m venv .venv) && .venv/bin/pip install -q -e \".[tpu]\""
if [[ -n "${FLAG_nfs:-}" ]]; then
  ssh_all "mountpoint -q /mnt/shared || (sudo apt-get install -y -q nfs-common && sudo mkdir -p /mnt/shared && sudo mount -t nfs -o rw,hard $(quote "$FLAG_nfs") /mnt/shared && sudo chmod a+w /mnt/shared)"
fi

note "the run, on all workers at once (detached; each worker logs to ~/vdit.log)"
ssh_all "cd ~/vdit && setsid nohup .venv/bin/vdit $(quote "${VDIT_ARGS[@]}") > ~/vdit.log 2>&1 < /dev/null & echo \$! > ~/vdit.pid"
note "worker 0's log until the run ends"
run gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" --worker=0 \
  --command='tail -n +1 -f --pid=$(cat ~/vdit.pid) ~/vdit.log'

if ((${FLAG_delete:-0})); then
  note "delete $NAME (--delete)"
  if ((${FLAG_queued:-0})); then
    run gcloud compute tpus queued-resources delete "$NAME" "${WHERE[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${WHERE[@]}" --quiet
  fi
fi
