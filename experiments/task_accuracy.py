"""Exact-match accuracy of a trained seq2seq task model on held-out examples.

    .venv/bin/python experiments/task_accuracy.py RUN_DIR [--examples 300] [--show 8]

Reads the run's validation rows (the cached `data.task` examples), decodes each source greedily
with the KV-cache generator, and counts the outputs that equal the target exactly (the held-out
loss and accuracy that training prints are per target token, teacher-forced). It also prints the
teacher-forced loss per target token with each row's own source and with the sources shuffled
across rows: the gap is how much the model reads the source rather than guessing from the
targets' own statistics."""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np

import llm_jax
from llm_jax.data.sources import open_corpus
from llm_jax.data.task_rows import task_rows
from llm_jax.data.tasks import PAD
from llm_jax.paths import cache_root


def target_nll(model, src_BS: np.ndarray, dec_BT1: np.ndarray) -> tuple[float, int]:
    """Summed cross-entropy (no label smoothing) and count of the target tokens, PAD hidden."""
    src_mask = src_BS != PAD
    tgt_in, tgt_out = np.maximum(dec_BT1[:, :-1], 0), dec_BT1[:, 1:]
    logits = model.logits(np.where(src_mask, src_BS, 0), tgt_in, attention_mask=src_mask)
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    weights = tgt_out != PAD
    picked = np.take_along_axis(logp, np.maximum(tgt_out, 0)[..., None], -1)[..., 0]
    return float(-(picked * weights).sum()), int(weights.sum())


def source_reliance(model, rows: np.ndarray, src_len: int, batch: int = 50) -> tuple[float, float]:
    """Loss per target token with each row's own source, and with the sources rolled by one row."""
    src, dec = rows[:, :src_len], rows[:, src_len:]
    losses = []
    for sources in (src, np.roll(src, 1, axis=0)):
        parts = [target_nll(model, sources[i:i + batch], dec[i:i + batch]) for i in range(0, len(rows), batch)]
        losses.append(sum(p[0] for p in parts) / sum(p[1] for p in parts))
    return losses[0], losses[1]


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
    own, shuffled = source_reliance(model, rows, src_len)
    print(f"{args.run_dir}: teacher-forced loss per target token {own:.3f} with each row's source, "
          f"{shuffled:.3f} with the sources shuffled across rows")
    print(f"{args.run_dir}: exact match {hits}/{len(rows)} = {hits / len(rows):.3f} ({cfg.data.task}, greedy)")
    for source, target, output in list(zip(sources, targets, outputs))[: args.show]:
        body = tok.decode(source).replace("\n", "\\n")
        print(f"  {'ok ' if output == target else '   '} {target!r:28} <- {output!r:28} from {body[:70]!r}")


if __name__ == "__main__":
    main()
