"""Mamba against attention as the sequence grows: forward and train-step time, peak memory and
decode time per token, on whatever device JAX has (issue 6's scaling targets).

    .venv/bin/python experiments/mamba_scaling.py [--lengths 512 1024 ... 16384]
        [--out experiments/results/mamba_scaling]

Models: `mamba_small` (8 Mamba blocks of width 128) and `gpt_small` (4 Transformer blocks of
width 128: the same width and about the same parameters), batch 1, float32 on CPU. For each
length L: the median of `--repeats` timed calls of the jitted forward (logits) and of the jitted
forward + backward (gradients of the mean loss), and the compiled train step's scratch memory
(XLA's memory analysis: temporaries + arguments + outputs). Decode: the median time of one jitted decode
step (a token in, logits and the new cache out) at position L: Mamba's constant-size state
against a KV cache of L + 1 slots, as `generate` holds. Writes OUT.json and OUT.png (log-log curves).
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

from llm_jax.config import load_config
from llm_jax.models.definition import model_def
from llm_jax.train.objectives import token_losses

VOCAB = 384
MODELS = {"mamba": "mamba_small", "attention": "gpt_small"}


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, length: int, repeats: int, decode: bool, train: bool = True) -> dict:
    preset = MODELS[name]
    cfg = load_config(preset, [f"train.seq_len={length}", f"model.max_seq_len={length + 64}", "train.batch_size=1",
                               "mesh.data=1"])
    mdef = model_def(cfg, VOCAB)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape), s.dtype), mdef.shapes)
    tokens = jnp.asarray(rng.integers(0, 256, (1, length + 1)), jnp.int32)

    forward = jax.jit(lambda p, t: mdef.merge(p)(t[:, :-1]).logits)

    def loss(p, t):
        return token_losses(mdef.merge(p)(t[:, :-1]).logits, t[:, 1:]).mean()

    row = {"model": name, "preset": preset, "length": length, "params": mdef.num_params}
    if train:
        grad = jax.jit(jax.grad(loss))
        memory = grad.lower(params, tokens).compile().memory_analysis()
        row.update(forward_s=timed(forward, params, tokens, repeats=repeats),
                   train_step_s=timed(grad, params, tokens, repeats=repeats),
                   train_step_memory_mb=(memory.temp_size_in_bytes + memory.argument_size_in_bytes
                                         + memory.output_size_in_bytes) / 2**20)
    if decode:
        row["decode_ms_per_token"] = decode_step_ms(cfg, mdef, params, length, repeats) * 1000
    print(json.dumps(row), flush=True)
    return row


def decode_step_ms(cfg, mdef, params, position: int, repeats: int) -> float:
    """Seconds of one jitted decode step (one token in, its logits and the new cache out) at
    `position`: a Mamba state, or a KV cache of position + 1 slots as `generate` would hold."""
    model = mdef.merge(params)
    slots = position + 1
    cache = model.init_cache(1, slots, jnp.float32)
    step = jax.jit(lambda p, c, t: mdef.merge(p)(t, positions_BT=jnp.full((1, 1), position), cache=c,
                                                   mask_BTS=jnp.ones((1, 1, slots), bool),
                                                   cache_index=jnp.int32(position)).logits)
    token = jnp.zeros((1, 1), jnp.int32)
    return timed(step, params, cache, token, repeats=max(repeats, 20))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib  # plotting only: imported where used, it is slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("forward_s", "forward (s)"), ("train_step_s", "forward + backward (s)"),
              ("train_step_memory_mb", "train-step memory (MB)"), ("decode_ms_per_token", "decode (ms / token)")]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, (key, label) in zip(axes, panels):
        for name in MODELS:
            pts = [(r["length"], r[key]) for r in rows if r["model"] == name and key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (prompt length for decode)")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"mamba_small vs gpt_small (width 128), batch 1, {jax.devices()[0].platform}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-max", type=int, default=8192, help="longest prompt for the decode timing")
    parser.add_argument("--out", default="experiments/results/mamba_scaling")
    parser.add_argument("--decode-only", action="store_true", help="time decode steps only (no training)")
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    if args.decode_only and out.with_suffix(".json").is_file():  # refresh the decode column only
        rows = [r for r in json.loads(out.with_suffix(".json").read_text())]
    for length in args.lengths:
        for name in MODELS:
            new = measure(name, length, args.repeats, decode=length <= args.decode_max, train=not args.decode_only)
            old = next((r for r in rows if r["model"] == name and r["length"] == length), None)
            if old is None:
                rows.append(new)
            else:
                old.update(new)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, out.with_suffix(".png"))
    for name in MODELS:
        by_len = {r["length"]: r for r in rows if r["model"] == name and "train_step_s" in r}
        lo = min(by_len)
        if 8 * lo in by_len:
            print(f"{name}: train step at {8 * lo} / at {lo}: "
                  f"{by_len[8 * lo]['train_step_s'] / by_len[lo]['train_step_s']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
