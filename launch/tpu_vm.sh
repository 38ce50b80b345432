#!/usr/bin/env bash
# Cloud TPU VM or pod slice, created directly (no queue): create it, install llm-jax on every
# host, run `llm-jax train` on every host, watch, stop, delete. See launch/README.md.
#
#   export BUCKET=my-bucket      # mounted with gcsfuse at /mnt/llm-jax on every worker
#   launch/tpu_vm.sh create
#   launch/tpu_vm.sh setup       # install gcsfuse + llm-jax, mount the bucket
#   launch/tpu_vm.sh train gpt_small train.steps=5000   # run.dir=/mnt/llm-jax/runs/llm-jax-gpt_small
#   launch/tpu_vm.sh logs
#   launch/tpu_vm.sh stop        # SIGTERM: checkpoint and exit; `train` again resumes
#   launch/tpu_vm.sh delete
#
# Every host runs the same command; jax.distributed.initialize() finds the other hosts of the
# slice from the TPU metadata server, so no coordinator address is passed.
set -euo pipefail

TPU_NAME="${TPU_NAME:-llm-jax}"
ZONE="${ZONE:-us-west4-a}"
# v5litepod-16: 16 v5e chips on 4 hosts. The number is chips for v5e/v6e, TensorCores for v4/v5p.
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"
# The TPU software image; it must match the TPU generation (v5e: v2-alpha-tpuv5-lite).
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"
PROJECT="${PROJECT:-}"
# Which worker `logs` follows: process 0 prints the training log; `WORKER=all` shows every host.
WORKER="${WORKER:-0}"

usage() {
  # printf, not cat: usage must print even where PATH has nothing (the test checks this).
  printf '%s\n' >&2 \
    "usage: launch/tpu_vm.sh {create|setup|train [CONFIG [KEY=VALUE ...]]|logs|stop|delete}" \
    "" \
    "  create   gcloud compute tpus tpu-vm create \$TPU_NAME (--accelerator-type, --version)" \
    "  setup    on every worker: install gcsfuse, mount \$BUCKET at /mnt/llm-jax, copy this" \
    "           checkout (or clone \$REPO_URL), pip install -e '.[tpu]'" \
    "  train    mount \$BUCKET if needed, then run 'llm-jax train CONFIG run.dir=\$RUN_DIR KEY=VALUE...'" \
    "           on every worker (CONFIG defaults to gpt_small; RUN_DIR defaults to" \
    "           /mnt/llm-jax/runs/\$TPU_NAME-CONFIG, a path in the bucket, never a gs:// URL)" \
    "  logs     follow the training log of worker \$WORKER (default 0)" \
    "  stop     SIGTERM on every worker: save a checkpoint and exit" \
    "  delete   delete the TPU" \
    "" \
    "settings (environment): TPU_NAME=$TPU_NAME ZONE=$ZONE ACCELERATOR_TYPE=$ACCELERATOR_TYPE" \
    "  RUNTIME_VERSION=$RUNTIME_VERSION PROJECT=${PROJECT:-<gcloud default>} BUCKET (setup, train)" \
    "  RUN_DIR REPO_URL WORKER"
  exit 2
}

# Checked before anything else so that a typo prints usage without needing gcloud or git.
case "${1:-}" in
  create | setup | train | logs | stop | delete) ;;
  *) usage ;;
esac
command="$1"
shift

# shellcheck source=launch/tpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/tpu_common.sh"

# Flags every gcloud call takes; never empty (bash 3.2 with `set -u` rejects empty arrays).
GCLOUD_FLAGS=("--zone=${ZONE}")
if [ -n "$PROJECT" ]; then GCLOUD_FLAGS+=("--project=${PROJECT}"); fi

on_workers() {  # on_workers WORKER COMMAND: run a shell command on the given worker(s)
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker="$1" --command="$2"
}

case "$command" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"
    ;;
  setup)
    require_bucket
    if [ -n "$REPO_URL" ]; then
      on_workers all "$(remote_setup_command clone)"
    else
      tarball="$(mktemp -d)/llm-jax.tar.gz"
      make_tarball "$tarball"
      gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:llm-jax.tar.gz" \
        "${GCLOUD_FLAGS[@]}" --worker=all
      rm -f "$tarball"
      on_workers all "$(remote_setup_command tarball)"
    fi
    ;;
  train)
    require_bucket
    build_train_args "$TPU_NAME" "" "$@"
    on_workers all "$(remote_train_command "${TRAIN_ARGS[@]}")"
    echo "started on every worker of $TPU_NAME; follow it with: launch/tpu_vm.sh logs" >&2
    ;;
  logs)
    on_workers "$WORKER" "$(remote_logs_command)"
    ;;
  stop)
    on_workers all "$(remote_stop_command)"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}"
    ;;
esac
