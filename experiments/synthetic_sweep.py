"""Train a synthetic task (selective copying, induction) without the data pipeline: rows from
`data/synthetic.py`, the real train and eval steps (`train/setup.py`), no grain, TFDS or
TensorBoard, so it runs on machines that have only JAX, Flax and Optax (the device machine).

    python experiments/synthetic_sweep.py PRESET [--variant NAME=KEY=VALUE,KEY=VALUE ...] [--steps N]
                                          [--eval-every N] [-- KEY=VALUE ...]

Each variant trains from the preset with its overrides (plus the shared ones after `--`) and
prints one JSON line per evaluation: step, eval loss and eval accuracy (the share of answer
tokens the argmax predicts, teacher-forced), and the seconds so far. Example, the Mamba paper's
Table 1 setting (selective_copy preset) with the S4-like ablation:

    python experiments/synthetic_sweep.py selective_copy --variant s6= --variant s4=model.ssm.selective=false
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np

from llm_jax.config import load_config
from llm_jax.data.synthetic import synthetic_rows
from llm_jax.data.tokenizer import ByteTokenizer
from llm_jax.models.base import model_vocab_size
from llm_jax.train.objectives import Vocab, build_objective
from llm_jax.train.run import evaluate
from llm_jax.train.setup import build_setup
from llm_jax.train.state import init_state
from llm_jax.train.trainer import Evaluate, Trainer


def run(preset: str, name: str, overrides: list[str], steps: int, eval_every: int) -> None:
    cfg = load_config(preset, [*overrides, f"train.steps={steps}", "train.tensorboard=false"])
    byte_vocab = ByteTokenizer.vocab_size  # the model's rows, as `llm-jax train` would have
    vocab = model_vocab_size(cfg, byte_vocab)
    setup = build_setup(cfg, vocab, build_objective(cfg, Vocab(byte_vocab, vocab, eos_id=byte_vocab - 1)))
    state = init_state(cfg, setup.mdef, setup.mesh, setup.tx, setup.shardings)
    train, val = synthetic_rows(cfg, "train"), synthetic_rows(cfg, "validation")
    order = np.random.default_rng(cfg.seed).permutation(len(train))
    B = cfg.train.batch_size
    val_batches = [setup.to_global(val[i:i + B]) for i in range(0, len(val) - B + 1, B)]
    start = time.perf_counter()

    def report(record: dict) -> None:
        print(json.dumps({"variant": name, "step": record["step"], "eval_loss": record["eval_loss"],
                          "eval_accuracy": record["eval_accuracy"],
                          "seconds": round(time.perf_counter() - start, 1)}), flush=True)

    def batches():
        for step in range(steps):
            i = step * B % (len(order) - B + 1)
            yield step, setup.to_global(train[order[i:i + B]])

    # The same loop as `llm-jax train` (a bounded queue of dispatched steps), with only an eval hook.
    hook = Evaluate(eval_every, steps, lambda params: evaluate(setup, params, val_batches, None), report)
    Trainer(setup.train_step, [hook]).run(state, batches())


def main() -> int:
    argv = sys.argv[1:]
    shared = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset")
    parser.add_argument("--variant", action="append", default=[], help="NAME=KEY=VALUE,KEY=VALUE (may be empty)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=500)
    args = parser.parse_args(argv)
    print(json.dumps({"device": str(jax.devices()[0]), "jax": jax.__version__}), flush=True)
    for variant in args.variant or ["default="]:
        name, _, keys = variant.partition("=")
        run(args.preset, name, [k for k in keys.split(",") if k] + shared, args.steps, args.eval_every)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
