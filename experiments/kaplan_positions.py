"""Held-out loss per token position for an LSTM and a Transformer of equal non-embedding size,
trained on the same tokens (the comparison of Kaplan et al. 2020, figure 7 right).

    .venv/bin/python experiments/kaplan_positions.py [--steps 1000] [--out runs/kaplan]

Trains `gpt_small` (4 layers x 128: 4 * 12 * 128^2 = 786k non-embedding matmul parameters) and
`lstm_small` with 6 layers (6 * 8 * 128^2 = 786k) on the stdlib corpus with the same batches and
steps, then evaluates both on the same held-out windows and writes OUT/kaplan_positions.png and
OUT/kaplan_positions.json. Kaplan et al. report that LSTMs improve only over the first ~100
tokens of context and then plateau, while Transformers keep improving with position.
Existing run directories are resumed, not overwritten.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

import llm_jax
from llm_jax.data import build_data, eval_batches

RUNS = {
    "Transformer": ["gpt_small"],
    "LSTM": ["lstm_small", "model.num_layers=6"],
}
EVAL_WINDOWS = 1024  # one position's mean over 1024 windows: standard error about 0.05 nats
BINS = ((1, 1), (2, 4), (5, 16), (17, 64), (65, 128), (129, 256))


def train(name: str, args: list[str], out: Path, steps: int) -> Path:
    run = out / name.lower()
    cmd = [sys.executable, "-m", "llm_jax.cli", "train", *args, f"run.dir={run}", f"train.steps={steps}",
           "train.sample_tokens=0", f"checkpoint.every={steps}"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return run


def non_embedding_params(model) -> int:
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(model.params):
        keys = [getattr(k, "key", "") for k in path]
        if not any(k in ("embed", "pos_embed", "head") for k in keys):
            total += math.prod(leaf.shape)
    return total


def loss_per_position(run: Path) -> tuple[np.ndarray, int]:
    model = llm_jax.load(run)
    cfg = model.config
    bundle = build_data(cfg, run)
    windows = eval_batches(bundle.val_tokens, cfg.train.seq_len, EVAL_WINDOWS, 1)[0]
    losses = []
    for rows in np.array_split(windows, 32):
        logits = model.logits(rows[:, :-1])
        logits = logits - logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        losses.append(-np.take_along_axis(logp, rows[:, 1:, None], axis=-1)[..., 0])
    return np.concatenate(losses).mean(0), non_embedding_params(model)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("runs/kaplan"))
    args = parser.parse_args()
    results = {}
    for name, preset in RUNS.items():
        run = train(name, preset, args.out, args.steps)
        per_pos, params = loss_per_position(run)
        results[name] = {"non_embedding_params": params, "loss_per_position": per_pos.tolist()}
        binned = {f"{a}-{b}": float(per_pos[a - 1:b].mean()) for a, b in BINS if b <= len(per_pos)}
        results[name]["binned"] = binned
        print(f"{name}: {params:,} non-embedding parameters; mean loss by position: "
              + ", ".join(f"{k}: {v:.3f}" for k, v in binned.items()), flush=True)

    import matplotlib  # plotting only: imported where used, it is slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ys = np.asarray(r["loss_per_position"])
        xs = np.arange(1, len(ys) + 1)
        line, = ax.plot(xs, ys, alpha=0.3, linewidth=0.8)
        # A running mean over 9 positions (narrower near the start) shows the trend through the noise.
        smooth = np.array([ys[max(0, i - min(4, i // 2)):i + min(4, i // 2) + 1].mean() for i in range(len(ys))])
        ax.plot(xs, smooth, color=line.get_color(),
                label=f"{name} ({r['non_embedding_params'] / 1e3:.0f}k non-embedding params)")
    ax.set_xscale("log")
    ax.set_xlabel("token position in context")
    ax.set_ylabel("held-out loss (nats per byte token)")
    ax.set_title(f"stdlib corpus, {args.steps} steps x 16 x 256 tokens")
    ax.legend()
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "kaplan_positions.png", dpi=120)
    (args.out / "kaplan_positions.json").write_text(json.dumps(results))
    print(f"wrote {args.out / 'kaplan_positions.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
