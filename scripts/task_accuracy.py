"""Exact-match accuracy of a trained seq2seq task model on held-out examples.

    .venv/bin/python scripts/task_accuracy.py RUN_DIR [--examples 300] [--show 8]

Reads the run's validation rows (the cached `data.task` examples), decodes each source greedily
with the KV-cache generator, and counts the outputs that equal the target exactly (the held-out
loss and accuracy that training prints are per target token, teacher-forced)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import llm_jax
from llm_jax.data.sources import open_corpus
from llm_jax.data.task_rows import task_rows
from llm_jax.paths import cache_root
from llm_jax.train.objectives import PAD


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--examples", type=int, default=300, help="validation examples to score")
    parser.add_argument("--show", type=int, default=8, help="print this many (source, target, output)")
    args = parser.parse_args()

    model = llm_jax.load(args.run_dir)
    cfg, tok = model.config, model.tokenizer
    if not cfg.data.task:
        raise SystemExit(f"error: {args.run_dir} was not trained on a data.task")
    if cfg.objective != "seq2seq":
        raise SystemExit(f"error: for a {cfg.objective} task the eval accuracy that training prints is its accuracy "
                         "(labels, or a synthetic task's answer tokens)")
    root = cache_root(cfg.data.cache_dir)
    rows = np.asarray(task_rows(cfg, open_corpus(cfg.data, root), tok, "validation", root))[: args.examples]
    src_len = cfg.train.src_len
    sources = [[t for t in row[:src_len] if t != PAD][:-1] for row in rows]  # without the EOS
    targets = [tok.decode([t for t in row[src_len + 1:] if t != PAD][:-1]) for row in rows]
    # Ids in, ids out: a source cut inside a UTF-8 character must not be re-encoded differently.
    outputs = [tok.decode(o) for o in model.generate(sources, max_new_tokens=cfg.train.seq_len, temperature=0)]
    hits = sum(o == t for o, t in zip(outputs, targets))
    print(f"{args.run_dir}: exact match {hits}/{len(rows)} = {hits / len(rows):.3f} ({cfg.data.task}, greedy)")
    for source, target, output in list(zip(sources, targets, outputs))[: args.show]:
        body = tok.decode(source).replace("\n", "\\n")
        print(f"  {'ok ' if output == target else '   '} {target!r:28} <- {output!r:28} from {body[:70]!r}")


if __name__ == "__main__":
    main()
