"""Throughput of the selective scan's three forms (issue 6's accelerator target).

    python experiments/ssm_scan_bench.py [--batch 8] [--length 4096] [--channels 1536] [--state 16]
                                         [--chunks 64 128 256] [--repeats 5] [--json OUT] [--pallas]
                                         [--pallas-gpu] [--skip-xla]

Times the jitted forward and forward + backward of `models.ssm.selective_scan` in float32 on
random inputs of one Mamba layer's shapes (default: a 768-wide model's d_inner 1536, N 16, at
L 4096): `sequential` (lax.scan one step at a time), `associative` (lax.associative_scan over
the whole sequence) and `chunked` (for each chunk length); with `--pallas` also the fused Pallas
kernels (`pallas`, for each chunk length: meant for a TPU; on CPU they run in interpret mode, so
keep the sizes tiny there); with `--pallas-gpu` the Triton kernels (`pallas_gpu`, meant for a GPU,
interpret mode on CPU; once per distinct chunk as it rounds them: a power of two, at most 16).
`--skip-xla` leaves out `chunked` (sequential, the speed-up's base, and associative always run).
Prints one JSON line per form: median seconds, tokens/s (batch x length / time), the speed-up
over sequential and the largest error of its outputs (y; the gradients of x, delta, B, C) relative
to sequential's largest value.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.models.ssm import selective_scan
from llm_jax.models.ssm_pallas_gpu import time_chunk as gpu_time_chunk


def max_relative_error(got, want) -> float:
    """The largest |got - want| of any output over the largest |want| of that output."""
    return max(float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
               for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--channels", type=int, default=1536)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="")
    parser.add_argument("--pallas", action="store_true", help="also time model.ssm.scan=pallas")
    parser.add_argument("--pallas-gpu", action="store_true", help="also time model.ssm.scan=pallas_gpu")
    parser.add_argument("--skip-xla", action="store_true", help="leave out the chunked scans")
    args = parser.parse_args()
    B, L, D, N = args.batch, args.length, args.channels, args.state
    rng = np.random.default_rng(0)

    def arr(*shape, lo=None, hi=None):
        a = rng.uniform(lo, hi, shape) if lo is not None else rng.normal(size=shape)
        return jnp.asarray(a, jnp.float32)

    inputs = (arr(B, L, D), arr(B, L, D, lo=1e-3, hi=1e-1),
              -jnp.asarray(np.tile(np.arange(1, N + 1), (D, 1)), jnp.float32), arr(B, L, N), arr(B, L, N),
              jnp.ones(D, jnp.float32))
    forms = [("sequential", 0), ("associative", 0)] + [("chunked", c) for c in args.chunks if not args.skip_xla]
    if args.pallas:
        forms += [("pallas", c) for c in args.chunks]
    if args.pallas_gpu:
        forms += [("pallas_gpu", c) for c in sorted({gpu_time_chunk(c) for c in args.chunks})]
    rows, base, reference = [], {}, {}
    print(json.dumps({"device": str(jax.devices()[0]), "jax": jax.__version__, "batch": B, "length": L,
                      "channels": D, "state": N}), flush=True)
    for mode, chunk in forms:
        def y(*a, mode=mode, chunk=chunk):
            return selective_scan(*a, mode=mode, chunk=chunk or 64)[0]

        fns = {"forward": jax.jit(y),
               "train": jax.jit(jax.grad(lambda *a, y=y: y(*a).sum(), argnums=(0, 1, 3, 4)))}
        row = {"scan": mode, "chunk": chunk or None}
        for name, fn in fns.items():
            try:
                out = jax.block_until_ready(fn(*inputs))
            except Exception as exc:  # out of memory, typically: record it and go on
                row[f"{name}_error"] = str(exc).splitlines()[0][:200]
                continue
            if mode == "sequential":
                reference[name] = out
            elif name in reference:  # a kernel compiled for the first time here should also be right
                row[f"{name}_max_rel_err_vs_sequential"] = max_relative_error(out, reference[name])
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                jax.block_until_ready(fn(*inputs))
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            row[f"{name}_s"] = seconds
            row[f"{name}_tokens_per_s"] = B * L / seconds
            base.setdefault(name, seconds)  # sequential comes first
            row[f"{name}_speedup_vs_sequential"] = base[name] / seconds
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
