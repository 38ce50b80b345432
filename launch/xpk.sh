#!/usr/bin/env bash
# A TPU slice (or several) on GKE through XPK, the way Google runs MaxText-style workloads: XPK
# creates the cluster and its TPU node pools, attaches the bucket with the Cloud Storage FUSE CSI
# driver, and submits `llm-jax train` as a JobSet on every host of every slice. See launch/README.md.
#
#   pip install xpk                               # plus gcloud, kubectl and docker on this machine
#   export BUCKET=my-bucket IMAGE=us-docker.pkg.dev/PROJECT/llm-jax/llm-jax:tpu
#   launch/xpk.sh cluster                         # xpk cluster create (TPU_TYPE x NUM_SLICES)
#   launch/xpk.sh storage                         # attach $BUCKET at /mnt/llm-jax
#   launch/xpk.sh train gpt_small train.steps=5000   # run.dir=/mnt/llm-jax/runs/llm-jax-gpt_small
#   launch/xpk.sh list                            # the cluster's workloads and their states
#   launch/xpk.sh stop                            # delete the workload: SIGTERM, checkpoint, exit
#   launch/xpk.sh delete                          # delete the cluster
set -euo pipefail

CLUSTER="${CLUSTER:-llm-jax}"
ZONE="${ZONE:-us-west4-a}"
PROJECT="${PROJECT:-}"
TPU_TYPE="${TPU_TYPE:-v5litepod-16}"
# Slices: more than 1 trains one model over the data-centre network (multi-slice).
NUM_SLICES="${NUM_SLICES:-1}"
# How the cluster gets its TPUs: on-demand, spot, or reservation:NAME.
CAPACITY="${CAPACITY:-on-demand}"
# The JobSet's name; a fixed one so that the same `train` command resumes the same run.
WORKLOAD="${WORKLOAD:-llm-jax}"
# The XPK storage (a name in the cluster) that mounts $BUCKET at /mnt/llm-jax in every pod.
STORAGE="${STORAGE:-llm-jax-bucket}"
# The image built from launch/gke/Dockerfile with EXTRA=tpu and pushed (required by `train`).
IMAGE="${IMAGE:-}"
# A JAX job cannot lose a host and carry on: XPK restarts every pod, and llm-jax resumes.
MAX_RESTARTS="${MAX_RESTARTS:-10}"
PRIORITY="${PRIORITY:-medium}"

usage() {
  # printf, not cat: usage must print even where PATH has nothing.
  printf '%s\n' >&2 \
    "usage: launch/xpk.sh {cluster|storage|train [CONFIG [KEY=VALUE ...]]|list|wait|stop|delete}" \
    "" \
    "  cluster   xpk cluster create \$CLUSTER: NUM_SLICES slices of TPU_TYPE (CAPACITY: on-demand," \
    "            spot or reservation:NAME)" \
    "  storage   xpk storage attach \$STORAGE: the bucket \$BUCKET at /mnt/llm-jax in every pod" \
    "  train     xpk workload create \$WORKLOAD running 'llm-jax train CONFIG run.dir=\$RUN_DIR KEY=VALUE...'" \
    "            on every host in \$IMAGE (RUN_DIR defaults to /mnt/llm-jax/runs/\$WORKLOAD-CONFIG;" \
    "            with NUM_SLICES > 1, mesh.dcn_data=\$NUM_SLICES is added before your overrides)" \
    "  list      the cluster's workloads" \
    "  wait      until \$WORKLOAD finishes (exit 0: succeeded)" \
    "  stop      xpk workload delete \$WORKLOAD: SIGTERM in every pod, which saves a checkpoint" \
    "  delete    xpk cluster delete \$CLUSTER" \
    "" \
    "settings (environment): CLUSTER=$CLUSTER ZONE=$ZONE PROJECT=${PROJECT:-<gcloud default>}" \
    "  TPU_TYPE=$TPU_TYPE NUM_SLICES=$NUM_SLICES CAPACITY=$CAPACITY WORKLOAD=$WORKLOAD STORAGE=$STORAGE" \
    "  MAX_RESTARTS=$MAX_RESTARTS PRIORITY=$PRIORITY BUCKET (storage) IMAGE (train) RUN_DIR"
  exit 2
}

case "${1:-}" in
  cluster | storage | train | list | wait | stop | delete) ;;
  *) usage ;;
esac
command="$1"
shift

# require_bucket, build_train_args, MOUNT_POINT and the gcsfuse rename limit, shared with the
# Cloud TPU VM scripts.
# shellcheck source=launch/tpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/tpu_common.sh"

XPK_FLAGS=("--cluster=${CLUSTER}" "--zone=${ZONE}")
if [ -n "$PROJECT" ]; then XPK_FLAGS+=("--project=${PROJECT}"); fi

case "$command" in
  cluster)
    case "$CAPACITY" in
      on-demand) capacity=("--on-demand") ;;
      spot) capacity=("--spot") ;;
      reservation:?*) capacity=("--reservation=${CAPACITY#reservation:}") ;;
      *)
        echo "error: CAPACITY must be on-demand, spot or reservation:NAME; got '$CAPACITY'" >&2
        exit 2
        ;;
    esac
    xpk cluster create "${XPK_FLAGS[@]}" --tpu-type="$TPU_TYPE" --num-slices="$NUM_SLICES" "${capacity[@]}"
    ;;
  storage)
    require_bucket
    # Orbax renames each finished checkpoint directory; a flat-namespace bucket refuses that
    # unless rename-dir-limit allows it (launch/README.md, "Why run.dir is a mounted path").
    xpk storage attach "$STORAGE" "${XPK_FLAGS[@]}" --type=gcsfuse --bucket="$BUCKET_NAME" \
      --mount-point="$MOUNT_POINT" --readonly=false --auto-mount=false --size=1024 \
      --mount-options="implicit-dirs,rename-dir-limit=${GCSFUSE_RENAME_DIR_LIMIT}"
    ;;
  train)
    if [ -z "$IMAGE" ]; then
      echo "error: set IMAGE to an llm-jax image with the tpu extra, built from launch/gke/Dockerfile" \
        "(docker build -f launch/gke/Dockerfile --build-arg EXTRA=tpu -t IMAGE . && docker push IMAGE)" >&2
      exit 2
    fi
    # Several slices: one replica per slice, only gradients cross the DCN (as tpu_queued.sh).
    slice_overrides=""
    if [ "$NUM_SLICES" -gt 1 ]; then slice_overrides="mesh.dcn_data=${NUM_SLICES}"; fi
    build_train_args "$WORKLOAD" "$slice_overrides" "$@"
    xpk workload create "${XPK_FLAGS[@]}" --workload="$WORKLOAD" --docker-image="$IMAGE" \
      --tpu-type="$TPU_TYPE" --num-slices="$NUM_SLICES" --max-restarts="$MAX_RESTARTS" \
      --priority="$PRIORITY" --storage="$STORAGE" \
      --command="llm-jax train $(printf '%q ' "${TRAIN_ARGS[@]}")"
    echo "submitted $WORKLOAD to $CLUSTER; follow it with: launch/xpk.sh list" >&2
    ;;
  list)
    xpk workload list "${XPK_FLAGS[@]}"
    ;;
  wait)
    xpk workload list "${XPK_FLAGS[@]}" --wait-for-job-completion="$WORKLOAD"
    ;;
  stop)
    xpk workload delete "${XPK_FLAGS[@]}" --workload="$WORKLOAD"
    ;;
  delete)
    xpk cluster delete "${XPK_FLAGS[@]}"
    ;;
esac
