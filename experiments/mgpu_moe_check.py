"""Check and time `model.moe.grouped_matmul=ragged_dot_mgpu` on a Hopper GPU (one short device run).

    python experiments/mgpu_moe_check.py [--rows 16384] [--d-model 1024] [--width 1792] [--experts 8]
                                         [--repeats 5] [--json OUT]

The tests run the three kernels on CPU in JAX's interpret mode (the two backward kernels with
what tests/mgpu_interpret.py lends the interpreter); this runs them compiled by Mosaic GPU. For one SwiGLU
expert MLP in bfloat16 (default: the `mixtral` preset's widths, 16384 routed rows, skewed group
sizes with an empty expert and rows past every expert): the output and the gradients of the rows
and of every weight against autodiff of float32 `lax.ragged_dot` on the same rounded inputs
(rtol 2e-2, absolute floor 2e-2 of the largest magnitude, as tests/test_moe_mgpu.py), then the
median forward + backward time of `ragged_dot_mgpu`, `blocked` and `ragged_dot`. One JSON line
per check and per form; exit status 1 when a check fails. On CPU it runs in interpret mode:
pass tiny sizes (--rows 200 --d-model 64 --width 128 --experts 4 --repeats 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.models import moe as moe_lib


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1792)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    M, D, F, E = args.rows, args.d_model, args.width, args.experts
    rng = np.random.default_rng(0)
    w = {"up": rng.normal(size=(E, D, F)) / D ** 0.5, "gate": rng.normal(size=(E, D, F)) / D ** 0.5,
         "down": rng.normal(size=(E, F, D)) / F ** 0.5}
    w = {k: jnp.asarray(v, jnp.bfloat16) for k, v in w.items()}
    x = jnp.asarray(rng.normal(size=(M, D)), jnp.bfloat16)
    dy = jnp.asarray(rng.normal(size=(M, D)), jnp.bfloat16)
    # Skewed sizes: expert 1 empty, the rest by a Dirichlet draw over 90% of the rows (10% past every expert).
    shares = rng.dirichlet(np.ones(E - 1))
    sizes = np.zeros(E, np.int64)
    sizes[[0, *range(2, E)]] = np.floor(shares * 0.9 * M)
    sizes = jnp.asarray(sizes, jnp.int32)
    used = int(sizes.sum())

    def grads(grouped, dtype, w, x, dy):
        cast = lambda t: jax.tree.map(lambda a: a.astype(dtype), t)  # noqa: E731
        y, pull = jax.vjp(lambda w, x: moe_lib._expert_mlp("swiglu", w, x, sizes, grouped), cast(w), cast(x))
        return y, *pull(cast(dy))

    def program(grouped, dtype):
        # The arrays are arguments, not constants baked into the program that XLA could fold away.
        return jax.jit(partial(grads, grouped, dtype))

    lines, failed = [], False
    print(json.dumps({"device": str(jax.devices()[0]), "jax": jax.__version__, "rows": M, "used": used,
                      "d_model": D, "width": F, "experts": E, "sizes": sizes.tolist()}), flush=True)
    want = program("ragged_dot", jnp.float32)(w, x, dy)
    got = program("ragged_dot_mgpu", jnp.bfloat16)(w, x, dy)
    for name, g, r in zip(["y", "dw", "dx"], got, want):
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(r)):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            rows = slice(None) if name == "dw" else slice(0, used)
            scale = float(np.abs(b[rows]).max(initial=1.0))
            ok = bool(np.allclose(a[rows], b[rows], rtol=2e-2, atol=2e-2 * scale))
            past_zero = name == "dw" or bool((a[used:] == 0).all())
            line = {"check": name + jax.tree_util.keystr(path), "ok": ok and past_zero,
                    "max_abs_err": float(np.abs(a[rows] - b[rows]).max()), "ref_max": scale,
                    "rows_past_zero": past_zero}
            failed |= not line["ok"]
            lines.append(line)
            print(json.dumps(line), flush=True)
    for grouped in ("ragged_dot_mgpu", "blocked", "ragged_dot"):
        step = program(grouped, jnp.bfloat16)
        jax.block_until_ready(step(w, x, dy))
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(step(w, x, dy))
            times.append(time.perf_counter() - start)
        flops = 2 * used * D * F * 3 * 3  # three matmuls, forward + two backward products each
        line = {"form": grouped, "median_s": statistics.median(times),
                "tflops": flops / statistics.median(times) / 1e12}
        lines.append(line)
        print(json.dumps(line), flush=True)
    if args.json:
        Path(args.json).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
