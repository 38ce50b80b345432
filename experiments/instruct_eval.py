"""Exact match per task kind of a run's greedy answers to the held-out instruction set.

    .venv/bin/python experiments/instruct_eval.py RUN_DIR [--examples 256] [--source instruct:stdlib]
        [--show 4] [--json OUT.json]

Any decoder run works: an instruction-tuned one, or the pretrained run before tuning (it is then
prompted with the same chat template: the user turn, then `<|assistant|>\\n`). The examples are
the first N validation records of the instruction set (`llm_jax.data.instruct`: files the
pretraining split also held out), those whose prompt and answer fit the model's positions. It
prints exact match overall and per kind, and the teacher-forced loss per answer token (the
answer's tokens and the EOS after it, as `train.loss_on=completion` scores them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np

from llm_jax.data.formats import chat_prompt_ids
from llm_jax.data.instruct import instruction_file
from llm_jax.data.jsonl_files import jsonl_lines
from llm_jax.inference.api import Model
from llm_jax.models.decoding import bounded_length
from llm_jax.paths import cache_root
from llm_jax.runtime.restore import restore_params
from llm_jax.train.exact_match import Completion, evaluate_exact_match, greedy_ids


def held_out_completions(source: str, val_fraction: float, tokenizer, cache: Path, limit: int,
                         max_len: int | None) -> list[Completion]:
    """The first `limit` validation records that fit `max_len` tokens (prompt, answer and EOS)."""
    found = instruction_file(source, val_fraction, cache)
    examples = []
    for i, line in jsonl_lines(found.path):
        if i not in found.held_out:
            continue
        record = json.loads(line)
        *asked, answer = record["messages"]
        example = Completion(chat_prompt_ids(asked, tokenizer.encode, tokenizer.eos_id),
                             tokenizer.encode(answer["content"]), record.get("kind", ""))
        if max_len is None or len(example.prompt) + len(example.answer) + 1 <= max_len:
            examples.append(example)
        if len(examples) == limit:
            break
    return examples


def answer_loss(model: Model, examples: list[Completion], width: int, eos_id: int, batch: int) -> float:
    """Teacher-forced cross entropy per answer token (answer and EOS), rows padded to `width`."""
    total = count = 0.0
    for start in range(0, len(examples), batch):
        chunk = examples[start:start + batch]
        ids = np.full((batch, width), eos_id, np.int32)  # one shape: one compiled program
        weights = np.zeros((batch, width - 1), np.float32)
        for b, e in enumerate(chunk):
            row = e.prompt + e.answer + [eos_id]
            ids[b, :len(row)] = row
            weights[b, len(e.prompt) - 1:len(row) - 1] = 1.0  # position j predicts token j + 1
        logp = np.asarray(jax.nn.log_softmax(model.logits(ids)[:, :-1].astype(np.float32), axis=-1))
        picked = np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
        total -= float((picked * weights).sum())
        count += float(weights.sum())
    return total / max(count, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--source", default="instruct:stdlib")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="the instruction set's split (default: the run's data.val_fraction)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--show", type=int, default=4, help="print this many prompts with both answers")
    parser.add_argument("--json", default="", help="also write the scores to this file")
    args = parser.parse_args()

    cfg, tokenizer, mdef, params, step = restore_params(args.run_dir)
    limit = bounded_length(cfg)
    examples = held_out_completions(args.source, args.val_fraction or cfg.data.val_fraction, tokenizer,
                                    cache_root(cfg.data.cache_dir), args.examples, limit)
    scores = evaluate_exact_match((mdef, params), cfg, tokenizer, examples, args.batch_size)
    model = Model(cfg, mdef, params, tokenizer)
    width = limit or max(len(e.prompt) + len(e.answer) + 1 for e in examples)
    scores["eval_answer_loss"] = answer_loss(model, examples, width, tokenizer.eos_id, args.batch_size)
    counts = {kind: sum(e.kind == kind for e in examples) for kind in sorted({e.kind for e in examples})}
    result = {"run": args.run_dir, "step": step, "examples": len(examples), "per_kind": counts, **scores}
    print(json.dumps(result, indent=1))
    if args.show:
        shown = examples[:args.show]
        ids = greedy_ids((mdef, params), cfg, [e.prompt for e in shown],
                         max_new_tokens=max(len(e.answer) for e in shown) + 1, eos_id=tokenizer.eos_id,
                         vocab_limit=tokenizer.vocab_size, batch_size=len(shown))
        for e, got in zip(shown, ids, strict=True):
            print(f"--- {e.kind}\n{tokenizer.decode(e.prompt)}\n=> {tokenizer.decode(got)!r} "
                  f"(answer {tokenizer.decode(e.answer)!r})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
