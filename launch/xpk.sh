#!/usr/bin/env bash
# A run on GKE TPU slices with xpk: build the image from the repository's Dockerfile, push it,
# create the workload (a JobSet: every worker of every slice runs the same vdit command), stream
# worker 0's log, delete on request.
#
#   launch/xpk.sh --cluster=C --zone=ZONE --tpu=v5p-32 --image=REGISTRY/vdit --workload=NAME
#       [--project=P] [--slices=N] [--tag=latest] [--storage=NAME] [--no_build] [--delete] [--dry_run] \
#       -- train --config=configs/default.py:B/2 --workdir=/mnt/shared/runs/b2 [--config.FIELD=VALUE ...]
#
# Run from the repository root (with gcloud, docker, kubectl and xpk set up for the cluster).
#  1. launch/fit.py compiles the train step for N slices of the TPU type (`vdit compile`, libtpu
#     here, no TPU; `mesh.dcn_data` = N) and stops here, naming the bytes, if it does not fit;
#  2. `docker build` (Dockerfile, the `tpu` extra) and `docker push` IMAGE:TAG (`--no_build`: use
#     the pushed image as it is);
#  3. `xpk workload create` with `--num-slices=N`: with N > 1 the config gets
#     `--config.mesh.dcn_data=N` (the data axis across slices over the data-center network) unless
#     the command sets it, and it must then equal N. JAX reads the workers of each slice from the
#     environment GKE sets (TPU_WORKER_HOSTNAMES, TPU_WORKER_ID; MEGASCALE_* across slices);
#  4. worker 0 of slice 0's log, followed with kubectl until the run ends; `--delete` then deletes
#     the workload.
# The work directory must be a volume every pod mounts (`--storage`: a Filestore or Cloud Storage
# FUSE volume attached to the cluster with `xpk storage attach`). After a preemption run the same
# command again (with --no_build): the workload restarts and `vdit train` resumes from the latest
# checkpoint.
source "$(dirname "$0")/common.sh"

USAGE="launch/xpk.sh --cluster=C --zone=ZONE --tpu=TYPE --image=REGISTRY/NAME --workload=NAME [--project=P] [--slices=N] [--tag=T] [--storage=NAME] [--no_build] [--delete] [--skip_fit_check] [--dry_run] -- train --config=... --workdir=DIR [...]"
parse_args "$USAGE" cluster zone tpu image workload project slices tag storage no_build! delete! skip_fit_check! -- "$@"
need cluster zone tpu image workload
[[ -f launch/fit.py ]] || die "run from the repository root (launch/fit.py not found)"
[[ -f Dockerfile ]] || die "no Dockerfile in the repository root"
SLICES="${FLAG_slices:-1}"
[[ "$SLICES" =~ ^[1-9][0-9]*$ ]] || die "--slices=$SLICES: expected a positive integer"
IMAGE="$FLAG_image:${FLAG_tag:-latest}"
W="$FLAG_workload"
vdit_flag workdir >/dev/null || die "the vdit command needs --workdir=DIR (on a volume every pod mounts)"
if dcn="$(vdit_flag config.mesh.dcn_data)"; then
  [[ "$dcn" == "$SLICES" ]] || die "--config.mesh.dcn_data=$dcn but --slices=$SLICES: they must be equal"
elif ((SLICES > 1)); then
  VDIT_ARGS+=("--config.mesh.dcn_data=$SLICES")
fi
XPK_WHERE=(--cluster="$FLAG_cluster" --zone="$FLAG_zone")
[[ -n "${FLAG_project:-}" ]] && XPK_WHERE+=(--project="$FLAG_project")

((${FLAG_skip_fit_check:-0})) || fit_check --topology="$FLAG_tpu"

if ((!${FLAG_no_build:-0})); then
  note "the image: this checkout with the tpu extra"
  run docker build --build-arg=EXTRA=tpu --tag="$IMAGE" --file=Dockerfile .
  run docker push "$IMAGE"
fi

note "the workload: $SLICES slice(s) of $FLAG_tpu, every worker runs the same command"
STORAGE=()
[[ -n "${FLAG_storage:-}" ]] && STORAGE=(--storage="$FLAG_storage")
run xpk workload create "${XPK_WHERE[@]}" --workload="$W" --docker-image="$IMAGE" \
  --tpu-type="$FLAG_tpu" --num-slices="$SLICES" "${STORAGE[@]}" --command="vdit $(quote "${VDIT_ARGS[@]}")"

note "worker 0 of slice 0: its log until the run ends"
POD0="jobset.sigs.k8s.io/jobset-name=$W,jobset.sigs.k8s.io/job-index=0,batch.kubernetes.io/job-completion-index=0"
run kubectl wait --for=condition=Ready pod --selector="$POD0" --timeout=24h
run kubectl logs --follow --selector="$POD0" --tail=-1

if ((${FLAG_delete:-0})); then
  note "delete the workload (--delete)"
  run xpk workload delete "${XPK_WHERE[@]}" --workload="$W"
fi
