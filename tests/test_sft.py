"""Supervised JSONL data (data.format prompt_completion and chat): exact rows, format detection,
bad records through the CLI, the cache, and a tiny GPT that learns completions it can then
generate for held-out prompts."""

import json
import random
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import llm_jax
from llm_jax.cli import main
from llm_jax.config import load_config
from llm_jax.data.build import build_data
from llm_jax.data.formats import BadRecord, chat_prompt_ids, encode_example
from llm_jax.data.jsonl_files import jsonl_held_out_lines
from llm_jax.data.sft_rows import resolve_format
from llm_jax.errors import UserError
from llm_jax.train.objectives import Vocab, build_objective, row_width

EOS = 256
T = 32


def byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def split_row(row: np.ndarray, seq_len: int = T) -> tuple[list[int], list[int]]:
    return row[:seq_len + 1].tolist(), row[seq_len + 1:].tolist()


def write_jsonl(path, records) -> str:
    """Records (dicts, or raw strings written as they are) one per line; returns the source spec."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return f"jsonl:{path}"


def test_prompt_completion_row_is_exact():
    line = json.dumps({"prompt": "2+2=", "completion": "4!"})
    tokens, weights = split_row(encode_example(line, "prompt_completion", byte_ids, EOS, "completion", T))
    example = byte_ids("2+2=") + byte_ids("4!") + [EOS]
    assert tokens == example + [EOS] * (T + 1 - len(example))
    # Weight j scores token j + 1: the completion's 2 bytes (tokens 4, 5) and the EOS (token 6).
    assert weights == [0, 0, 0, 1, 1, 1] + [0] * (T - 6)
    _, every = split_row(encode_example(line, "prompt_completion", byte_ids, EOS, "all", T))
    assert every == [1] * 6 + [0] * (T - 6)  # every real token after the first; padding never


def test_chat_row_is_exact():
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Bye"},
                           {"role": "assistant", "content": "Ok"}], "id": 7}  # extra fields are ignored
    seq_len = 96
    row = encode_example(json.dumps(record), "chat", byte_ids, EOS, "completion", seq_len)
    tokens, weights = split_row(row, seq_len)
    pieces = [("<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n", 0), ("Yo", 1), ([EOS], 1),
              ("<|user|>\nBye\n<|assistant|>\n", 0), ("Ok", 1), ([EOS], 1)]
    expected, scored = [], []
    for piece, weight in pieces:
        ids = piece if isinstance(piece, list) else byte_ids(piece)
        expected += ids
        scored += [weight] * len(ids)
    assert tokens == expected + [EOS] * (seq_len + 1 - len(expected))
    assert weights == scored[1:] + [0] * (seq_len + 1 - len(expected))
    assert sum(weights) == 6  # "Yo", EOS, "Ok", EOS
    _, every = split_row(encode_example(json.dumps(record), "chat", byte_ids, EOS, "all", seq_len), seq_len)
    assert every == [1] * (len(expected) - 1) + [0] * (seq_len + 1 - len(expected))
    # The generation prompt of the conversation so far is the row's tokens up to the second reply.
    history = record["messages"][:4]
    prompt = chat_prompt_ids(history, byte_ids, EOS)
    assert prompt == expected[:len(prompt)] and expected[len(prompt):len(prompt) + 2] == byte_ids("Ok")


@pytest.mark.parametrize(("fmt", "record", "reason"), [
    ("prompt_completion", "{not json", "not valid JSON"),
    ("prompt_completion", "[1, 2]", "a JSON list, not an object"),
    ("prompt_completion", {"prompt": "a"}, "no field 'completion'"),
    ("prompt_completion", {"prompt": 3, "completion": "b"}, "field 'prompt' is int, not text"),
    ("prompt_completion", {"prompt": "a", "completion": ""}, "empty completion"),
    ("prompt_completion", {"prompt": "a" * 30, "completion": "bcd"}, "34 tokens, longer than train.seq_len+1=33"),
    ("chat", {"messages": "hi"}, "field 'messages' must be a non-empty list"),
    ("chat", {"messages": [{"role": "bot", "content": "x"}]}, "messages[0] has role 'bot'"),
    ("chat", {"messages": [{"role": "user", "content": ["x"]}]}, "messages[0]: field 'content' is list"),
    ("chat", {"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
])
def test_bad_records_are_refused(fmt, record, reason):
    line = record if isinstance(record, str) else json.dumps(record)
    with pytest.raises(BadRecord, match=reason.replace("[", r"\[").replace("+", r"\+")):
        encode_example(line, fmt, byte_ids, EOS, "completion", T)


def good_records(n: int) -> list[dict]:
    return [{"prompt": f"q{i}:", "completion": f"a{i}"} for i in range(n)]


def test_cli_names_the_file_and_line_of_a_bad_record_and_writes_nothing(tmp_path, capsys):
    cache = tmp_path / "cache"
    bad_chat = {"messages": [{"role": "user", "content": "no reply"}]}
    for records, line, reason in [(good_records(5) + ["{oops"], 6, "not valid JSON"),
                                  (good_records(3) + [{"prompt": "p", "completion": ""}], 4, "empty completion"),
                                  (good_records(2) + [{"prompt": "p", "completion": "x" * 40}], 3,
                                   "42 tokens, longer than")]:
        source = write_jsonl(tmp_path / "pc.jsonl", records)
        code = main(["train", "gpt_tiny", f"run.dir={tmp_path / 'run'}", f"data.source={source}",
                     f"data.cache_dir={cache}", "data.format=prompt_completion"])
        err = capsys.readouterr().err
        assert code == 2 and f"error: {tmp_path / 'pc.jsonl'}:{line}: {reason}" in err, err
        assert "Traceback" not in err
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                                 {"role": "assistant", "content": "b"}]}, bad_chat])
    assert main(["train", "gpt_tiny", f"run.dir={tmp_path / 'run'}", f"data.source={source}",
                 f"data.cache_dir={cache}"]) == 2  # auto: chat, from the first record
    assert f"error: {tmp_path / 'chat.jsonl'}:2: no assistant turn" in capsys.readouterr().err
    # Nothing half-written: no rows or metadata in the cache, no run directory.
    assert not [p for p in (cache / "sft").iterdir() if not p.name.startswith(".")]
    assert not (tmp_path / "run").exists()


def test_skip_bad_records_counts_and_skips_them(tmp_path, capsys):
    records = good_records(20)
    records[3] = "not json"
    records[7] = {"prompt": "p"}
    records[11] = {"prompt": "p", "completion": "y" * 40}
    source = write_jsonl(tmp_path / "pc.jsonl", records)
    cfg = load_config("gpt_tiny", [f"data.source={source}", f"data.cache_dir={tmp_path / 'cache'}",
                                   "data.skip_bad_records=true", "data.val_fraction=0.2"])
    bundle = build_data(cfg, tmp_path / "run")
    err = capsys.readouterr().err
    assert "3 bad records skipped (line 4: not valid JSON" in err and "line 8: no field 'completion'" in err
    assert len(err.strip().splitlines()) == 1  # one log line
    held_out = jsonl_held_out_lines(tmp_path / "pc.jsonl", 0.2)
    good = [i for i in range(20) if i not in (3, 7, 11)]
    assert len(bundle.val_tokens) == len([i for i in good if i in held_out]) >= 1
    assert len(bundle.train_tokens) == len(good) - len(bundle.val_tokens) >= 1
    # Each split holds exactly its lines' examples, in file order.
    for split_rows, lines in ((bundle.train_tokens, [i for i in good if i not in held_out]),
                              (bundle.val_tokens, [i for i in good if i in held_out])):
        firsts = [bytes(r[:4].astype(np.uint8)).decode().split(":")[0] for r in np.asarray(split_rows)]
        assert firsts == [f"q{i}" for i in lines]
    # Cached: a second build reads the same rows and reports the same count.
    again = build_data(cfg, tmp_path / "run2")
    np.testing.assert_array_equal(again.train_tokens, bundle.train_tokens)
    assert "3 bad records skipped" in capsys.readouterr().err


def test_rows_are_cached_by_what_decides_them(tmp_path):
    source = write_jsonl(tmp_path / "pc.jsonl", good_records(10))
    cache = tmp_path / "cache"

    def rows(*overrides):
        cfg = load_config("gpt_tiny", [f"data.source={source}", f"data.cache_dir={cache}", *overrides])
        return np.asarray(build_data(cfg, tmp_path / "run").train_tokens)

    completion = rows()
    assert len(list((cache / "sft").glob("*.json"))) == 1
    everything = rows("train.loss_on=all")
    np.testing.assert_array_equal(completion[:, :T + 1], everything[:, :T + 1])
    assert (everything[:, T + 1:].sum(1) > completion[:, T + 1:].sum(1)).all()
    assert rows("train.seq_len=16").shape[1] == 33
    assert len(list((cache / "sft").glob("*.json"))) == 3
    np.testing.assert_array_equal(rows(), completion)
    assert len(list((cache / "sft").glob("*.json"))) == 3  # the first entry was reused


def test_rows_use_the_runs_tokenizer(tmp_path):
    """A Hugging Face tokenizer's own ids and end-of-text; sentencepiece has no corpus to train on."""
    from llm_jax.data.tokenizer import HFTokenizer

    hf = Path(__file__).parent / "fixtures" / "hf" / "gpt2" / "tokenizer.json"
    record = {"prompt": "def add(a, b):", "completion": " return a + b"}
    source = write_jsonl(tmp_path / "pc.jsonl", [record] * 4)
    cfg = load_config("gpt_tiny", [f"data.source={source}", f"data.cache_dir={tmp_path / 'cache'}",
                                   f"data.tokenizer=hf:{hf}"])
    bundle = build_data(cfg, tmp_path / "run")
    tok = HFTokenizer(hf)
    example = tok.encode(record["prompt"]) + tok.encode(record["completion"]) + [tok.eos_id]
    assert tok.eos_id != EOS and len(example) < len(byte_ids(record["prompt"] + record["completion"]))
    tokens, weights = split_row(np.asarray(bundle.train_tokens)[0])
    assert tokens == example + [tok.eos_id] * (T + 1 - len(example))
    n_prompt = len(tok.encode(record["prompt"]))
    assert weights == [0] * (n_prompt - 1) + [1] * (len(example) - n_prompt) + [0] * (T + 1 - len(example))
    with pytest.raises(UserError, match="use data.tokenizer=byte or hf:"):
        build_data(load_config("gpt_tiny", [f"data.source={source}", f"data.cache_dir={tmp_path / 'cache'}",
                                            "data.tokenizer=sentencepiece"]), tmp_path / "sp")


def test_auto_format_detection_and_arch_errors(tmp_path):
    pc = write_jsonl(tmp_path / "pc.jsonl", good_records(3))
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "assistant", "content": "x"}]}])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello"}, {"prompt": "a", "completion": "b"}])
    for source, found, objective in [(pc, "prompt_completion", "masked_causal"), (chat, "chat", "masked_causal"),
                                     (text, "auto", "causal"), ("stdlib", "auto", "causal")]:
        cfg = resolve_format(load_config("gpt_tiny", [f"data.source={source}"]))
        assert (cfg.data.format, cfg.objective) == (found, objective)
    cfg = resolve_format(load_config("gpt_tiny", [f"data.source={pc}"]))
    assert row_width(cfg) == 2 * T + 1
    # The objective smooths over the tokenizer's ids here (a synthetic task: over its own ids).
    objective = build_objective(load_config("gpt_tiny", [f"data.source={pc}", "train.label_smoothing=0.1",
                                                         "data.format=prompt_completion"]), Vocab(257, 384, EOS))
    assert objective.smoothing_ids == 257 and objective.smoothing == 0.1
    rows = jnp.asarray(encode_example(json.dumps(good_records(1)[0]), "prompt_completion", byte_ids, EOS,
                                      "completion", T))[None]
    inputs, targets, weights = objective.data(rows, 0)
    assert targets[0, 2].item() == ord("a") and weights[0].tolist()[:5] == [0, 0, 1, 1, 1]
    # Explicit formats that cannot apply, and an arch that cannot take the detected one.
    for arch_preset in ("lstm_small", "mamba_small"):  # the recurrent cells and Mamba take them too
        assert load_config(arch_preset, [f"data.source={chat}", "data.format=chat"]).objective == "masked_causal"
    with pytest.raises(UserError, match="needs data.source=jsonl:PATH"):
        load_config("gpt_tiny", ["data.format=chat"])
    with pytest.raises(UserError, match=r"needs model.arch=.*gpt.*, not bert"):
        load_config("bert_small", [f"data.source={chat}", "data.format=chat"])
    with pytest.raises(UserError, match="data.task=selective_copy builds its own rows"):
        load_config("gpt_tiny", [f"data.source={pc}", "data.format=prompt_completion", "data.task=selective_copy"])
    with pytest.raises(UserError, match=r"not t5 .*data.format=auto found prompt_completion records"):
        resolve_format(load_config("t5_small", [f"data.source={pc}"]))


def test_cli_refuses_an_arch_for_a_detected_format(tmp_path, capsys):
    pc = write_jsonl(tmp_path / "pc.jsonl", good_records(3))
    assert main(["train", "bert_small", f"data.source={pc}", f"run.dir={tmp_path / 'run'}"]) == 2
    assert "needs model.arch=" in capsys.readouterr().err and not (tmp_path / "run").exists()


COMPLETIONS = {"A": " alpha", "B": " bravo", "C": " charlie"}


def noisy_prompts(path, n: int = 240) -> str:
    """Prompts of 16 random letters and digits (about ln 36 = 3.6 nats each, unlearnable), then a
    marker that picks one of three fixed completions."""
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    records = []
    for _ in range(n):
        marker = rng.choice("ABC")
        records.append({"prompt": "".join(rng.choice(alphabet) for _ in range(16)) + f" {marker}:",
                        "completion": COMPLETIONS[marker]})
    return write_jsonl(path, records)


def train_noisy(tmp_path, name: str, *overrides: str) -> list[dict]:
    source = noisy_prompts(tmp_path / "noisy.jsonl")
    run = tmp_path / name
    assert main(["train", "gpt_tiny", f"run.dir={run}", f"data.source={source}", f"data.cache_dir={tmp_path / 'c'}",
                 "data.val_fraction=0.1", "train.steps=100", "train.eval_every=100", "train.log_every=10",
                 "optim.lr=1e-2", "train.sample_tokens=0", "checkpoint.every=0", "train.tensorboard=false",
                 *overrides]) == 0
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # trains (about 10 s here)
def test_completions_are_learnt_and_generated_for_held_out_prompts(tmp_path):
    records = train_noisy(tmp_path, "completion")
    final = [r for r in records if "eval_loss" in r][-1]
    assert final["step"] == 100 and final["eval_loss"] < 0.05 and final["eval_accuracy"] == 1.0, final
    assert "eval_bpb" not in final  # loss per completion token, not bits per byte of a text
    loss = [r["loss"] for r in records if "loss" in r]
    assert loss[-1] < loss[0] / 20
    model = llm_jax.load(tmp_path / "completion")
    lines = (tmp_path / "noisy.jsonl").read_text().splitlines()
    held_out = [json.loads(lines[i]) for i in sorted(jsonl_held_out_lines(tmp_path / "noisy.jsonl", 0.1))]
    assert len(held_out) >= 10
    replies = model.generate([r["prompt"] for r in held_out], max_new_tokens=12, temperature=0)
    assert replies == [r["completion"] for r in held_out]


@pytest.mark.slow  # trains (about 10 s here)
def test_scoring_the_noisy_prompts_too_keeps_the_loss_high(tmp_path):
    """loss_on=all scores 16 noise bytes per example: the eval loss stays far above the
    completion-only run's (which the test above brings under 0.05)."""
    final = [r for r in train_noisy(tmp_path, "all", "train.loss_on=all") if "eval_loss" in r][-1]
    assert final["eval_loss"] > 1.5, final


@pytest.mark.slow  # trains (about 10 s here)
def test_chat_replies_are_learnt_and_generated_after_the_assistant_header(tmp_path):
    """Chats: a system turn, a user turn of noise and a marker, the assistant's reply picked by the
    marker. The reply to a held-out chat, prompted with `chat_prompt_ids`, is exactly its own."""
    rng = random.Random(1)
    chats = []
    for _ in range(200):
        marker = rng.choice("ABC")
        noise = "".join(rng.choice("abcdefghij") for _ in range(8))
        chats.append({"messages": [{"role": "system", "content": "Reply."},
                                   {"role": "user", "content": f"{noise} {marker}"},
                                   {"role": "assistant", "content": COMPLETIONS[marker].strip()}]})
    source = write_jsonl(tmp_path / "chat.jsonl", chats)
    run = tmp_path / "run"
    assert main(["train", "gpt_tiny", f"run.dir={run}", f"data.source={source}", f"data.cache_dir={tmp_path / 'c'}",
                 "data.val_fraction=0.1", "train.seq_len=64", "train.steps=150", "train.eval_every=150",
                 "optim.lr=1e-2", "train.sample_tokens=0", "checkpoint.every=0", "train.tensorboard=false"]) == 0
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["step"] == 150 and final["eval_loss"] < 0.05 and final["eval_accuracy"] == 1.0, final
    model = llm_jax.load(run)
    tok = model.tokenizer
    held_out = [chats[i]["messages"] for i in sorted(jsonl_held_out_lines(tmp_path / "chat.jsonl", 0.1))]
    prompts = [chat_prompt_ids(messages[:2], tok.encode, tok.eos_id) for messages in held_out]
    replies = model.generate(prompts, max_new_tokens=10, temperature=0)
    assert [tok.decode(r) for r in replies] == [messages[2]["content"] for messages in held_out]


@pytest.mark.slow  # trains (about 10 s here)
def test_same_losses_from_the_same_config_and_after_a_resume(tmp_path, capsys):
    def losses(name: str, steps: int) -> list[tuple[int, float]]:
        records = train_noisy(tmp_path, name, f"train.steps={steps}", "train.eval_every=0", "train.log_every=1")
        return [(r["step"], r["loss"]) for r in records if "loss" in r]

    whole = losses("a", 10)
    assert len(whole) == 10
    assert losses("b", 5) == whole[:5]
    # The same command with more steps resumes at step 5 (data.format=auto resolves as before).
    assert losses("b", 10) == whole
    assert "resumed from checkpoint at step 5" in capsys.readouterr().err
