#!/usr/bin/env bash
# Multi-slice TPU example: two v5litepod-16 slices (2 x 16 chips) from one queued resource,
# training one model together. Inside a slice the chips talk over ICI (fast, dedicated links);
# between slices they talk over DCN (the data-centre network, much slower). The mesh therefore
# has two kinds of axes: mesh.data/fsdp/tensor/expert lay out the chips of one slice (ICI), and
# mesh.dcn_data/dcn_fsdp say how many slices sit along data/fsdp (DCN). Here: dcn_data=2 (one
# replica per slice, only gradients cross the DCN) and fsdp=-1 (parameters sharded over the 16
# chips of each slice). See launch/README.md, "Multi-slice TPU".
#
#   export BUCKET=my-bucket      # mounted with gcsfuse at /mnt/llm-jax on every worker
#   launch/tpu_multislice.sh create && launch/tpu_multislice.sh wait
#   launch/tpu_multislice.sh setup
#   launch/tpu_multislice.sh train   # run.dir=/mnt/llm-jax/runs/llm-jax-multislice-gpt_small
#   launch/tpu_multislice.sh logs
#   launch/tpu_multislice.sh delete
#
# Every subcommand is tpu_queued.sh's, with NODE_COUNT=2; tpu_queued.sh adds
# mesh.dcn_data=$NODE_COUNT to the training command. jax.distributed.initialize() finds both
# slices by itself (the queued resource publishes MEGASCALE_* settings on every host).
set -euo pipefail

export NODE_COUNT="${NODE_COUNT:-2}"
export QR_NAME="${QR_NAME:-llm-jax-multislice}"
export TPU_NAME="${TPU_NAME:-llm-jax-slice}"
export ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"

# `train` with no arguments trains the example below. The global batch must split over
# dcn_data * fsdp = 2 * 16 = 32 ways, hence train.batch_size=32 (gpt_small's 16 would not).
if [ "${1:-}" = train ] && [ $# -eq 1 ]; then
  set -- train gpt_small mesh.data=1 mesh.fsdp=-1 train.batch_size=32
fi

exec "$(dirname "${BASH_SOURCE[0]}")/tpu_queued.sh" "$@"
