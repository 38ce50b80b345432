#!/usr/bin/env bash
# Issue 19's GPU measurements in one command bounded to BUDGET_S (default 540 s), for a session
# with an H200 (docs/benchmarks.md, "The next GPU session"). Parts, in priority order; once the
# budget is spent the remaining parts are skipped, and a part that fails (out of memory, a
# kernel that does not compile, its timeout) is recorded and the next one runs:
#   a  environment: versions, devices, whether llm_jax imports
#   b  gpt_1b bf16 seq 2048: the best earlier setting (batch 16) and a larger batch (24), then
#      one profiled run (5 steps) summed by scripts/profile_summary.py   (target MFU 0.60)
#   c  the compiled ragged_dot_mgpu kernels against lax.ragged_dot (experiments/mgpu_moe_check.py),
#      then mixtral against the dense model of equal active parameters, grouped_matmul=blocked and
#      ragged_dot_mgpu                                                    (target step ratio 1.3x)
#   d  selective scan at L 4096 and 16384: the fused Pallas GPU scan against associative
#   e  gpt_1b attention: Pallas GPU (Triton) flash against cuDNN
# Everything goes to OUT: results.jsonl (one record per measurement or failure), log.txt,
# summary.txt (printed at the end), profile_summary.txt/.json and the trace itself
# (perfetto_trace.json.gz) when it is small enough to bring back; at most 8 files, none deeper,
# so that all of OUT comes back from the device machine. The raw profile goes to a temporary
# directory (PROFILE_DIR to choose one).
#   usage: [DRY=1] [PARTS='a b c d e'] [BUDGET_S=540] [PYTHON=python3] experiments/gpu_issue19.sh OUT
# DRY=1 runs the same parts with tiny presets on a CPU in a minute or two (the script's own test).
set -uo pipefail  # not -e: each part's failure is recorded and the next part runs

out=${1:?usage: [DRY=1] [PARTS='a b c d e'] [BUDGET_S=540] experiments/gpu_issue19.sh OUT}
python=${PYTHON:-python3}
parts=${PARTS:-a b c d e}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 2
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
results=$out/results.jsonl
log=$out/log.txt
: > "$results"
: > "$log"
export PYTHONUNBUFFERED=1
# One process at a time owns the GPU: let it take more than JAX's default 75% (batch 24 of
# gpt_1b needs about 105 GB of the H200's 139).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

if [ "${DRY:-0}" = 1 ]; then
  budget=${BUDGET_S:-300}
  gpt=gpt_tiny; gpt_best="train.batch_size=4"; gpt_larger="train.batch_size=8"
  gpt_common="bench.steps=2 bench.warmup=1 mesh.cpu_devices=1"; profile_steps=2
  moe=moe_small; dense="model.moe.num_experts=0"
  moe_common="model.dtype=bfloat16 model.num_layers=1 model.d_model=64 train.batch_size=2 train.seq_len=32 bench.steps=2 bench.warmup=1 mesh.cpu_devices=1"
  scan_short="--batch 1 --length 64 --channels 8 --state 4 --chunks 16 --repeats 1"
  scan_long="--batch 1 --length 128 --channels 8 --state 4 --chunks 16 --repeats 1"
  attn_base=blockwise  # cuDNN's stand-in on a CPU
  mgpu_check="--rows 200 --d-model 64 --width 128 --experts 4 --repeats 1"
  attn_common="bench.steps=2 bench.warmup=1 mesh.cpu_devices=1"
else
  budget=${BUDGET_S:-540}
  # Batch 16 was the best setting in experiments/results/gpu_bench_h200*.jsonl (MFU 0.506).
  gpt=gpt_1b; gpt_best="train.batch_size=16"; gpt_larger="train.batch_size=24"
  gpt_common="bench.steps=10 bench.warmup=2"; profile_steps=5
  # As in experiments/results/gpu_moe_h200.jsonl: mixtral's 2 active experts of 1792 = a dense 3584.
  moe=mixtral; dense="model.moe.num_experts=0 model.d_ff=3584"
  moe_common="train.batch_size=8 bench.steps=10 bench.warmup=2"
  scan_short="--batch 8 --length 4096"
  scan_long="--batch 1 --length 16384 --chunks 128 256 --repeats 3"
  attn_base=cudnn
  mgpu_check="--repeats 5"
  attn_common="bench.steps=5 bench.warmup=2"
fi
deadline=$((SECONDS + budget))
profile_root=${PROFILE_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/issue19-profile.XXXXXX")}

say() { echo "$*" | tee -a "$log"; }

# record PART NAME RC SECONDS STDOUT_FILE STDERR_FILE: one results.jsonl line per JSON line the
# command printed, or one failure record with its exit status and the last line of its stderr.
record() {
  "$python" - "$@" "$results" <<'EOF'
import json, sys
part, name, rc, seconds, stdout, stderr, results = sys.argv[1:]
lines = []
for text in open(stdout, errors="replace").read().splitlines():
    if text.startswith("{"):
        try:
            lines.append(json.loads(text))
        except ValueError:
            pass
base = {"part": part, "name": name, "rc": int(rc), "seconds": round(float(seconds), 1)}
with open(results, "a") as f:
    for value in lines:
        f.write(json.dumps({**base, "result": value}) + "\n")
    if int(rc) != 0 or not lines:
        err = [t for t in open(stderr, errors="replace").read().splitlines() if t.strip()]
        why = "timed out" if int(rc) in (124, 137) else (err[-1][:300] if err else "no output")
        f.write(json.dumps({**base, "error": why}) + "\n")
EOF
}

# measure PART NAME LIMIT_S COMMAND...: runs COMMAND under a timeout of LIMIT_S or what is left of
# the budget, whichever is less; skipped (and recorded so) when under 15 s are left.
measure() {
  local part=$1 name=$2 limit=$3
  shift 3
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 15 ]; then
    say "== [$part] $name: skipped, the budget is spent"
    printf '{"part": "%s", "name": "%s", "skipped": "budget spent"}\n' "$part" "$name" >> "$results"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local command="$*"
  say "== [$part] $name (limit ${limit} s): ${command:0:300}"
  local stdout stderr start=$SECONDS rc
  stdout=$(mktemp) stderr=$(mktemp)
  timeout --kill-after=10 "$limit" "$@" > "$stdout" 2> "$stderr"
  rc=$?
  cat "$stdout" >> "$log"
  grep -v -e '^WARNING: All log messages before absl' -e '^E0000' "$stderr" | tail -n 20 >> "$log"
  record "$part" "$name" "$rc" "$((SECONDS - start))" "$stdout" "$stderr"
  tail -n 3 "$stdout"
  [ "$rc" -eq 0 ] || say "   failed (exit $rc): $(tail -n 1 "$stderr")"
  rm -f "$stdout" "$stderr"
  return "$rc"
}

wants() { [[ " $parts " == *" $1 "* ]]; }

bench() {  # bench PART NAME LIMIT PRESET KEY=VALUE...
  local part=$1 name=$2 limit=$3 preset=$4
  shift 4
  measure "$part" "$name" "$limit" "$python" -m llm_jax.cli bench "$preset" "$@" --json
}

say "issue 19 GPU script: OUT=$out parts='$parts' budget ${budget} s dry=${DRY:-0}"

# The device machine's image lacks a few of llm_jax's dependencies (pydantic and its own, zstandard):
# wheels in .whl/ (git-ignored; `experiments/gpu_wheels.sh` fetches them; name .whl in the device
# tool's carry) are installed beside it.
if compgen -G "$root/.whl/*.whl" > /dev/null; then
  site=${TMPDIR:-/tmp}/issue19-site
  if "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$root"/.whl/*.whl >> "$log" 2>&1; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    say "installed $(cd "$root/.whl" && echo *.whl) into $site"
  else
    say "could not install the wheels in .whl/ (see log.txt)"
  fi
fi

if wants a; then
  measure a env 60 "$python" -c '
import json, platform
info = {"python": platform.python_version()}
try:
    import jax, jaxlib
    info.update(jax=jax.__version__, jaxlib=jaxlib.__version__, backend=jax.default_backend(),
                devices=[str(d) for d in jax.devices()],
                device_kind=jax.devices()[0].device_kind)
    import flax, optax, pydantic, yaml
    info.update(flax=flax.__version__, optax=optax.__version__, pydantic=pydantic.__version__)
    import llm_jax.cli  # noqa: F401 - every import the bench needs
    info["llm_jax"] = "imports"
except Exception as exc:
    info["import_error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(info))'
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv,noheader 2>&1 | tee -a "$log"
  if grep -q '"import_error"' "$results"; then  # every later part would fail the same way: stop now
    say "llm_jax does not import here: $(grep -o '"import_error": "[^"]*"' "$results"); carry the missing" \
      "packages as wheels in .whl/ (docs/benchmarks.md, The next GPU session) and run again"
    exit 3
  fi
fi

if wants b; then
  # shellcheck disable=SC2086  # the *_common and variant strings are several key=value words
  {
    bench b "$gpt $gpt_best" 180 "$gpt" $gpt_best $gpt_common
    bench b "$gpt $gpt_larger" 180 "$gpt" $gpt_larger $gpt_common
    bench b "$gpt $gpt_best profiled" 180 "$gpt" $gpt_best $gpt_common bench.steps=$profile_steps \
      bench.profile_dir="$profile_root/profile" &&
      measure b "profile summary" 90 "$python" scripts/profile_summary.py "$profile_root/profile" \
        --json --top 25 --steps "$profile_steps"
  }
  # The summary's JSON (read from the trace once, above) as a file of its own and as the table.
  "$python" -c 'import json, sys
sys.path.insert(0, "scripts")
from profile_summary import format_table
for line in open(sys.argv[1]):
    record = json.loads(line)
    if record.get("name") == "profile summary" and "result" in record:
        open(sys.argv[2], "w").write(json.dumps(record["result"]) + "\n")
        open(sys.argv[3], "w").write(format_table(record["result"]) + "\n")' \
    "$results" "$out/profile_summary.json" "$out/profile_summary.txt"
  if [ -s "$out/profile_summary.txt" ]; then
    say "$(head -n 30 "$out/profile_summary.txt")"
    trace=$(find "$profile_root/profile" -name perfetto_trace.json.gz | head -n 1)
    # Brought back whole only under the device tool's 16 MiB per file.
    if [ -n "$trace" ] && [ "$(stat -c %s "$trace")" -lt 16000000 ]; then cp "$trace" "$out/"; fi
  fi
fi

if wants c; then
  # shellcheck disable=SC2086
  {
    # First the compiled kernels' numbers (the weights' gradient kernel never ran in the tests).
    measure c "ragged_dot_mgpu check" 120 "$python" experiments/mgpu_moe_check.py $mgpu_check
    bench c "$moe dense (equal active)" 150 "$moe" $dense $moe_common
    bench c "$moe blocked" 150 "$moe" model.moe.grouped_matmul=blocked $moe_common
    bench c "$moe ragged_dot_mgpu" 150 "$moe" model.moe.grouped_matmul=ragged_dot_mgpu $moe_common
  }
fi

if wants d; then
  scan_flags=(--pallas-gpu --skip-xla)  # the fused Triton scan beside associative and sequential
  # shellcheck disable=SC2086
  {
    measure d "scan L short" 150 "$python" experiments/ssm_scan_bench.py $scan_short "${scan_flags[@]}"
    measure d "scan L long" 150 "$python" experiments/ssm_scan_bench.py $scan_long "${scan_flags[@]}"
  }
fi

if wants e; then
  # shellcheck disable=SC2086
  {
    bench e "$gpt $gpt_best attention=$attn_base" 120 "$gpt" $gpt_best model.attention=$attn_base $attn_common
    bench e "$gpt $gpt_best attention=pallas_gpu" 180 "$gpt" $gpt_best model.attention=pallas_gpu $attn_common
  }
fi

"$python" experiments/gpu_issue19_summary.py "$results" > "$out/summary.txt" 2>&1
tee -a "$log" < "$out/summary.txt"
say "done in $SECONDS s; files in $out: $(cd "$out" && echo *)"
