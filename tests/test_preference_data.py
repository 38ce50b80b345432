"""Preference pairs (data.format=preference): rows against a hand computation, every bad record
named by FILE:LINE, the supervised pipeline's split and cache, and `llm-jax pairs` on a tiny run."""

import gzip
import json
import re

import numpy as np
import pytest

from llm_jax.alignment.pairs import pair_of
from llm_jax.cli import main
from llm_jax.config import load_config
from llm_jax.data import arith
from llm_jax.data.build import build_data
from llm_jax.data.formats import BadRecord, detect_format
from llm_jax.data.jsonl_files import jsonl_held_out_lines
from llm_jax.data.preference import encode_preference, row_width, split_rows
from llm_jax.data.sft_rows import resolve_format
from llm_jax.data.tokenizer import ByteTokenizer
from llm_jax.errors import UserError

EOS = 256
T = 12  # train.seq_len of the hand-computed rows: W = 13
W = T + 1
TOK = ByteTokenizer()


def ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def padded(values: list[int], fill: int) -> list[int]:
    return values + [fill] * (W - len(values))


def encode(record, seq_len: int = T) -> np.ndarray:
    return encode_preference(record if isinstance(record, str) else json.dumps(record), TOK.encode, EOS, seq_len)


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return f"jsonl:{path}"


def pairs(n: int) -> list[dict]:
    return [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(n)]


def chat(user: str, answer: str) -> list[dict]:
    return [{"role": "system", "content": "add"}, {"role": "user", "content": user},
            {"role": "assistant", "content": answer}]


def test_prompt_form_row_by_hand():
    row = encode({"prompt": "37+485=", "chosen": "522", "rejected": "-1"})
    assert row.shape == (row_width(T),) == (4 * W,) and row.dtype == np.int32
    chosen_tokens, chosen_mask, rejected_tokens, rejected_mask = split_rows(row[None])
    assert chosen_tokens[0].tolist() == padded(ids("37+485=522") + [EOS], EOS)
    assert chosen_mask[0].tolist() == padded([0] * 7 + [1, 1, 1, 1], 0)  # 5, 2, 2, EOS
    assert rejected_tokens[0].tolist() == padded(ids("37+485=-1") + [EOS], EOS)
    assert rejected_mask[0].tolist() == padded([0] * 7 + [1, 1, 1], 0)
    # The prompt is shared; log p(completion) sums over mask positions, EOS included.
    assert chosen_tokens[0, :7].tolist() == rejected_tokens[0, :7].tolist() == ids("37+485=")
    # A full row: no padding left, the EOS is the last token.
    full = encode({"prompt": "1+1=", "chosen": "2" * 8, "rejected": "3"})
    assert split_rows(full)[0].tolist() == ids("1+1=" + "2" * 8) + [EOS] and split_rows(full)[1].sum() == 9
    # An empty prompt: the first token is predicted by nothing, so mask[0] stays 0.
    assert split_rows(encode({"prompt": "", "chosen": "ab", "rejected": "c"}))[1].tolist() == padded([0, 1, 1], 0)


def test_chat_form_row_scores_only_the_last_turn():
    seq_len = 64
    row = encode({"chosen": chat("2+2", "4"), "rejected": chat("2+2", "five")}, seq_len)
    chosen_tokens, chosen_mask, rejected_tokens, rejected_mask = split_rows(row)
    prompt = ids("<|system|>\nadd\n<|user|>\n2+2\n<|assistant|>\n")
    n = len(prompt)
    assert chosen_tokens[:n + 2].tolist() == prompt + ids("4") + [EOS]
    assert (chosen_tokens[n + 2:] == EOS).all()
    assert chosen_mask.tolist() == [0] * n + [1, 1] + [0] * (seq_len + 1 - n - 2)
    assert rejected_tokens[:n + 5].tolist() == prompt + ids("five") + [EOS]
    assert rejected_mask.tolist() == [0] * n + [1] * 5 + [0] * (seq_len + 1 - n - 5)


def test_split_rows_takes_jax_arrays_and_refuses_odd_widths():
    import jax.numpy as jnp

    rows = jnp.arange(2 * 4 * W).reshape(2, 4 * W)
    parts = split_rows(rows)
    assert [p.shape for p in parts] == [(2, W)] * 4 and int(parts[3][1, 0]) == 4 * W + 3 * W
    with pytest.raises(ValueError, match="divisible by 4"):
        split_rows(np.zeros((1, 10)))


BAD = [
    ("[1, 2]", "a JSON list, not an object"),
    ('{"prompt": "1+1=", "chosen": "2"', "not valid JSON"),
    ({"prompt": "1+1=", "chosen": "2"}, "no field 'rejected'"),
    ({"chosen": "2", "rejected": "3"}, "no field 'prompt'"),
    ({"prompt": 1, "chosen": "2", "rejected": "3"}, "field 'prompt' is int, not text"),
    ({"prompt": "1+1=", "chosen": ["2"], "rejected": "3"}, "field 'chosen' is list, not text"),
    ({"prompt": "1+1=", "chosen": "2", "rejected": "2"}, "chosen and rejected are the same completion"),
    ({"prompt": "1+1=", "chosen": "", "rejected": "3"}, "empty chosen completion"),
    ({"prompt": "1+1=", "chosen": "2", "rejected": ""}, "empty rejected completion"),
    ({"prompt": "1+1=", "chosen": "2", "rejected": "3" * 9}, "rejected: 14 tokens, longer than train.seq_len+1=13"),
    ({"chosen": chat("a", "b"), "rejected": chat("c", "d")}, "must share every message but the last"),
    ({"chosen": chat("a", "b"), "rejected": chat("a", "b")}, "chosen and rejected are the same completion"),
    ({"chosen": chat("a", "b")[:2], "rejected": chat("a", "d")[:2]}, "the last message is the user's"),
    ({"chosen": chat("a", ""), "rejected": chat("a", "d")}, "empty chosen completion"),
    ({"chosen": chat("a", "b"), "rejected": 5}, "rejected: field 'rejected' must be a non-empty list"),
    ({"chosen": chat("a", "b")}, "no field 'rejected'"),
    ({"chosen": [{"role": "bot", "content": "b"}], "rejected": chat("a", "b")}, "chosen[0] has role 'bot'"),
]


@pytest.mark.parametrize("record, reason", BAD)
def test_bad_records_are_refused(record, reason):
    with pytest.raises(BadRecord, match=re.escape(reason)):
        encode(record, seq_len=T if "longer" in reason else 64)


def preference_config(source: str, tmp_path, *overrides: str):
    return load_config("gpt_tiny", [f"data.source={source}", f"data.cache_dir={tmp_path / 'cache'}",
                                    f"train.seq_len={T}", *overrides])


def test_every_bad_record_is_one_error_naming_file_and_line(tmp_path):
    for record, reason in BAD:
        path = tmp_path / "prefs.jsonl"
        source = write_jsonl(path, [*pairs(3), record, *pairs(2)])
        cfg = preference_config(source, tmp_path, "data.format=preference")
        with pytest.raises(UserError) as caught:
            build_data(cfg, tmp_path / "run")
        message = str(caught.value)
        assert message.startswith(f"{path}:4: ") and reason in message and "\n" not in message, message
    assert not [p for p in (tmp_path / "cache" / "sft").iterdir() if not p.name.startswith(".")]


def test_the_cli_prints_one_error_line_and_makes_no_run(tmp_path, capsys):
    path = tmp_path / "prefs.jsonl"
    source = write_jsonl(path, [*pairs(3), {"prompt": "p", "chosen": "x", "rejected": "x"}])
    code = main(["train", "gpt_tiny", f"run.dir={tmp_path / 'run'}", f"data.source={source}",
                 f"data.cache_dir={tmp_path / 'cache'}", f"train.seq_len={T}"])  # auto: preference
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == (f"error: {path}:4: chosen and rejected are the same completion (nothing to "
                                         "prefer) (data.skip_bad_records=true skips such records)")
    assert not (tmp_path / "run").exists()


def test_rows_of_a_file_split_by_line_and_cached(tmp_path, capsys):
    records = pairs(30)
    records[5] = {"prompt": "5+1=", "chosen": "6"}  # skipped
    path = tmp_path / "prefs.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    cfg = resolve_format(preference_config(f"jsonl:{path}", tmp_path, "data.skip_bad_records=true",
                                           "data.val_fraction=0.2"))
    assert detect_format(json.dumps(records[0])) == "preference"
    assert cfg.data.format == "preference" and cfg.objective == "dpo"
    bundle = build_data(cfg, tmp_path / "run")
    err = capsys.readouterr().err
    assert "1 bad records skipped (line 6: no field 'rejected')" in err
    held_out = jsonl_held_out_lines(path, 0.2)
    good = [i for i in range(30) if i != 5]
    for rows, lines in ((bundle.train_tokens, [i for i in good if i not in held_out]),
                        (bundle.val_tokens, [i for i in good if i in held_out])):
        assert len(lines) >= 1 and rows.shape == (len(lines), 4 * W)
        np.testing.assert_array_equal(rows, np.stack([encode(records[i]) for i in lines]))
    scored = sum(len(records[i]["chosen"]) + len(records[i]["rejected"]) + 2 for i in good)  # digits and EOS
    assert f"{scored} scored tokens" in err
    again = build_data(cfg, tmp_path / "run2")  # from the cache
    np.testing.assert_array_equal(again.train_tokens, bundle.train_tokens)
    assert not bundle.val_kinds


def test_preference_config_checks():
    with pytest.raises(UserError, match="data.format=preference reads JSONL records; it needs data.source=jsonl"):
        load_config("gpt_tiny", ["data.format=preference"])
    with pytest.raises(UserError, match="preference trains a causal decoder"):
        load_config("bert_small", ["data.format=preference", "data.source=jsonl:x.jsonl"])
    with pytest.raises(UserError, match="eval_exact_match"):
        load_config("gpt_tiny", ["data.format=preference", "data.source=jsonl:x.jsonl", "train.eval_exact_match=4"])


def test_pair_recipe_by_hand():
    problem = arith.Problem("37+485=", "522")

    def fits(prompt, text):
        return len(text) < 6

    # A right sample is chosen, the worst (first of the lowest reward) rejected.
    assert pair_of(problem, ["512", "522", "x", "y"], fits) == {
        "prompt": "37+485=", "chosen": "522", "rejected": "x", "chosen_reward": 1.0, "rejected_reward": 0.0}
    # None right: the true answer is chosen.
    record = pair_of(problem, ["512", "999"], fits)
    assert record["chosen"] == "522" and record["rejected"] == "999" and record["rejected_reward"] == 0.1
    assert pair_of(problem, ["512", "x"], fits)["rejected_reward"] == 0.0
    assert pair_of(problem, ["512"], fits)["rejected_reward"] == 0.3667  # 0.1 + 0.4 * 2/3, rounded
    # Empty samples and samples too long are never rejected; all right (or nothing left): no pair.
    assert pair_of(problem, ["", "1234567", "523"], fits)["rejected"] == "523"
    assert pair_of(problem, ["522", " 522"], fits) is None  # (" 522" is right too)
    assert pair_of(problem, ["", "1234567"], fits) is None


@pytest.mark.slow  # trains a tiny model 30 steps, then samples (about 35 s here)
def test_pairs_command_writes_valid_records_and_never_overwrites(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "sft_arith", f"run.dir={run}", f"data.cache_dir={tmp_path / 'cache'}", "train.steps=30",
                 "optim.warmup_steps=5", "optim.lr=1e-2",  # (enough to write digits and stop: pairs that fit)
                 "model.num_layers=1", "model.d_model=32", "model.d_ff=64", "train.batch_size=8", "train.log_every=10",
                 "train.eval_every=0", "train.eval_exact_match=0", "checkpoint.every=30"]) == 0
    out = tmp_path / "pairs.jsonl"
    capsys.readouterr()
    assert main(["pairs", str(run), "--out", str(out), "--count", "12", "--samples", "3", "--seed", "5"]) == 0
    said = capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert said.startswith(f"wrote {out}: {len(records)} pairs from 12 problems") and 3 <= len(records) <= 12, said
    problems = {p.prompt: p for p in arith.problems("train", 12, seed=5)}
    for r in records:
        problem = problems[r["prompt"]]
        assert r["chosen_reward"] == arith.reward(problem, r["chosen"]) == 1.0
        assert r["rejected_reward"] == round(arith.reward(problem, r["rejected"]), 4) < 1.0
        assert arith.correct(problem, r["chosen"])  # right sample or the true answer
        encode(r, seq_len=16)  # a valid preference record for the run's train.seq_len
    assert [r["prompt"] for r in records] == [p for p in problems if p in {r["prompt"] for r in records}]
    before = out.read_bytes()
    assert main(["pairs", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {out} exists; pairs writes a new file (remove it or choose another --out)"
    assert out.read_bytes() == before
