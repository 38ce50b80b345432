#!/usr/bin/env bash
# The accelerator benchmark of the core stack: tokens/s and MFU of the ~1B GPT (configs/gpt_1b.yaml)
# in bf16 at seq 2048, at a few batch sizes and remat policies. One JSON line per variant goes
# to OUT/bench.jsonl; a variant that fails (out of memory, say) prints its error and the next runs.
#   usage: [REPEATS=N] [VARIANTS='k=v ...|k=v ...'] experiments/gpu_bench.sh OUT [PRESET] [PER_VARIANT_TIMEOUT_S] [-- extra key=value ...]
set -u
out=${1:?usage: experiments/gpu_bench.sh OUT [PRESET] [TIMEOUT_S] [-- KEY=VALUE ...]}
preset=${2:-gpt_1b}
per_run=${3:-200}
shift $(( $# < 3 ? $# : 3 ))
[ "${1:-}" = "--" ] && shift
mkdir -p "$out"
python=${PYTHON:-python3}
"$python" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
variants=(
  "train.batch_size=8"
  "train.batch_size=16"
  "train.batch_size=16 model.remat=dots_no_batch"
  "train.batch_size=8 model.attention=xla"
)
# VARIANTS="a b|c" replaces the list ('|' between variants); REPEATS=N runs each N times, in turns.
if [ -n "${VARIANTS:-}" ]; then IFS='|' read -r -a variants <<< "$VARIANTS"; fi
runs=()
for _ in $(seq "${REPEATS:-1}"); do runs+=("${variants[@]}"); done
for variant in "${runs[@]}"; do
  echo "== $preset $variant $*"
  # shellcheck disable=SC2086  # a variant is several key=value words
  if line=$(timeout "$per_run" "$python" -m llm_jax.cli bench "$preset" $variant "$@" --json); then
    echo "$line"
    printf '{"variant": "%s", "result": %s}\n' "$variant" "$line" >> "$out/bench.jsonl"
  else
    echo "variant failed: $variant"
  fi
done
