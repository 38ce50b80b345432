#!/usr/bin/env bash
# Cloud TPU through a queued resource: the request waits in a queue until capacity frees up
# (optionally as cheaper, preemptible Spot capacity), then becomes one TPU slice or, with
# NODE_COUNT > 1, several slices that train together over the data-centre network (multi-slice;
# see tpu_multislice.sh). See launch/README.md.
#
#   export BUCKET=my-bucket                # mounted with gcsfuse at /mnt/llm-jax on every worker
#   launch/tpu_queued.sh create            # SPOT=1 for Spot capacity, NODE_COUNT=2 for 2 slices
#   launch/tpu_queued.sh wait              # until the queued resource is ACTIVE
#   launch/tpu_queued.sh setup             # install gcsfuse + llm-jax, mount the bucket
#   launch/tpu_queued.sh train gpt_small train.steps=5000   # run.dir=/mnt/llm-jax/runs/llm-jax-qr-gpt_small
#   launch/tpu_queued.sh logs
#   launch/tpu_queued.sh delete
set -euo pipefail

QR_NAME="${QR_NAME:-llm-jax-qr}"
# The TPU node's name (one slice) or the prefix of the nodes' names (several slices).
TPU_NAME="${TPU_NAME:-llm-jax}"
ZONE="${ZONE:-us-west4-a}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"
PROJECT="${PROJECT:-}"
# Slices: 1 is a plain slice; more gives a multi-slice job, one node per slice.
NODE_COUNT="${NODE_COUNT:-1}"
# 1: Spot capacity (cheaper, can be preempted at any time; re-run `train` to resume).
SPOT="${SPOT:-0}"
WORKER="${WORKER:-0}"

usage() {
  # printf, not cat: usage must print even where PATH has nothing.
  printf '%s\n' >&2 \
    "usage: launch/tpu_queued.sh {create|wait|list|describe|setup|train [CONFIG [KEY=VALUE ...]]|logs|stop|delete}" \
    "" \
    "  create    gcloud compute tpus queued-resources create \$QR_NAME (NODE_COUNT slices, SPOT=1: --spot)" \
    "  wait      poll until the queued resource is ACTIVE" \
    "  list      queued resources in \$ZONE" \
    "  describe  state of \$QR_NAME" \
    "  setup     on every worker of every slice: install gcsfuse, mount \$BUCKET at /mnt/llm-jax," \
    "            copy this checkout (or clone \$REPO_URL), install" \
    "  train     mount \$BUCKET if needed, then run 'llm-jax train CONFIG run.dir=\$RUN_DIR KEY=VALUE...'" \
    "            on every worker of every slice (RUN_DIR defaults to /mnt/llm-jax/runs/\$QR_NAME-CONFIG;" \
    "            with NODE_COUNT > 1, mesh.dcn_data=\$NODE_COUNT is added before your overrides)" \
    "  logs      follow the training log of worker \$WORKER of the first slice" \
    "  stop      SIGTERM on every worker: save a checkpoint and exit" \
    "  delete    delete the queued resource and its TPU nodes" \
    "" \
    "settings (environment): QR_NAME=$QR_NAME TPU_NAME=$TPU_NAME ZONE=$ZONE" \
    "  ACCELERATOR_TYPE=$ACCELERATOR_TYPE RUNTIME_VERSION=$RUNTIME_VERSION NODE_COUNT=$NODE_COUNT" \
    "  SPOT=$SPOT PROJECT=${PROJECT:-<gcloud default>} BUCKET (setup, train) RUN_DIR REPO_URL WORKER"
  exit 2
}

case "${1:-}" in
  create | wait | list | describe | setup | train | logs | stop | delete) ;;
  *) usage ;;
esac
command="$1"
shift

# shellcheck source=launch/tpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/tpu_common.sh"

GCLOUD_FLAGS=("--zone=${ZONE}")
if [ -n "$PROJECT" ]; then GCLOUD_FLAGS+=("--project=${PROJECT}"); fi

# on_workers NODE WORKER COMMAND: run a shell command on the given slice(s) and worker(s).
on_workers() {
  gcloud compute tpus queued-resources ssh "$QR_NAME" "${GCLOUD_FLAGS[@]}" \
    --node="$1" --worker="$2" --command="$3"
}

case "$command" in
  create)
    # One node is named TPU_NAME; several are named from the prefix TPU_NAME, one per slice.
    if [ "$NODE_COUNT" -gt 1 ]; then
      nodes=("--node-count=${NODE_COUNT}" "--node-prefix=${TPU_NAME}")
    else
      nodes=("--node-id=${TPU_NAME}")
    fi
    if [ "$SPOT" = 1 ]; then nodes+=("--spot"); fi
    gcloud compute tpus queued-resources create "$QR_NAME" "${GCLOUD_FLAGS[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${nodes[@]}"
    ;;
  wait)
    # WAITING_FOR_RESOURCES -> PROVISIONING -> ACTIVE; FAILED or SUSPENDED will not recover.
    while :; do
      state="$(gcloud compute tpus queued-resources describe "$QR_NAME" "${GCLOUD_FLAGS[@]}" \
        --format='value(state.state)')"
      echo "$(date +%H:%M:%S) $QR_NAME: ${state:-unknown}" >&2
      case "$state" in
        ACTIVE) break ;;
        FAILED | SUSPENDED | SUSPENDING) exit 1 ;;
      esac
      sleep 60
    done
    ;;
  list)
    gcloud compute tpus queued-resources list "${GCLOUD_FLAGS[@]}"
    ;;
  describe)
    gcloud compute tpus queued-resources describe "$QR_NAME" "${GCLOUD_FLAGS[@]}"
    ;;
  setup)
    require_bucket
    if [ -n "$REPO_URL" ]; then
      on_workers all all "$(remote_setup_command clone)"
    else
      tarball="$(mktemp -d)/llm-jax.tar.gz"
      make_tarball "$tarball"
      gcloud compute tpus queued-resources scp "$tarball" "$QR_NAME:llm-jax.tar.gz" \
        "${GCLOUD_FLAGS[@]}" --node=all --worker=all
      rm -f "$tarball"
      on_workers all all "$(remote_setup_command tarball)"
    fi
    ;;
  train)
    # Several slices: the mesh's DCN axes must multiply to the number of slices, so put them
    # along data by default (each slice holds a replica; only gradients cross the DCN). Users
    # may override it, e.g. `mesh.dcn_data=1 mesh.dcn_fsdp=2`.
    slice_overrides=""
    if [ "$NODE_COUNT" -gt 1 ]; then slice_overrides="mesh.dcn_data=${NODE_COUNT}"; fi
    require_bucket
    build_train_args "$QR_NAME" "$slice_overrides" "$@"
    on_workers all all "$(remote_train_command "${TRAIN_ARGS[@]}")"
    echo "started on every worker of $QR_NAME; follow it with: launch/tpu_queued.sh logs" >&2
    ;;
  logs)
    on_workers 0 "$WORKER" "$(remote_logs_command)"
    ;;
  stop)
    on_workers all all "$(remote_stop_command)"
    ;;
  delete)
    # --force also deletes the TPU nodes; without it the request fails while nodes exist.
    gcloud compute tpus queued-resources delete "$QR_NAME" "${GCLOUD_FLAGS[@]}" --force
    ;;
esac
