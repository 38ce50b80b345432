"""Instruction tuning: the embedded stdlib instruction set (records, kinds, split, answers that
are what the source says), exact match of greedy completions (the computation, and the metric in
a tiny run's metrics.jsonl), and the instruct_stdlib preset."""

import ast
import json
import random
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from llm_jax.cli import main
from llm_jax.config import load_config
from llm_jax.data.formats import encode_example
from llm_jax.data.instruct import (
    KINDS,
    MAX_ANSWER_BYTES,
    QUESTIONS,
    function_records,
    instruction_records,
    package_held_out_files,
)
from llm_jax.data.sft_rows import resolve_format
from llm_jax.data.tasks import NAME_PLACEHOLDER, outer_functions, package_label, signature
from llm_jax.errors import UserError
from llm_jax.train.exact_match import (
    completion_of_row,
    completions_of_rows,
    describe_exact_match,
    exact_match_scores,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
EOS = 256
# A few real stdlib files: two from packages (module_of), the rest plain modules; the corpus split
# is given by hand here (the real one is by path hash over ~1800 files).
FILES = {"textwrap.py": "train", "shlex.py": "train", "fnmatch.py": "validation", "bisect.py": "validation",
         "email/utils.py": "train", "email/quoprimime.py": "train", "json/decoder.py": "train",
         "xml/dom/minidom.py": "train", "xml/dom/pulldom.py": "train", "xml/sax/saxutils.py": "train"}


def stdlib_files() -> list[tuple[str, str, str]]:
    return [(path, (STDLIB / path).read_text(encoding="utf-8"), split) for path, split in FILES.items()]


@pytest.fixture(scope="module")
def records() -> dict[str, list[dict]]:
    files = stdlib_files()
    return instruction_records(files, package_held_out_files(files, 0.3))


def test_the_set_is_deterministic_has_every_kind_and_disjoint_splits(records):
    files = stdlib_files()
    again = instruction_records(files, package_held_out_files(files, 0.3))
    assert json.dumps(again) == json.dumps(records)
    for split in ("train", "validation"):
        assert {r["kind"] for r in records[split]} == set(KINDS), split
    train_files = {r["source"] for r in records["train"]}
    val_files = {r["source"] for r in records["validation"]}
    assert train_files and val_files and not train_files & val_files
    # Function kinds are asked about files the corpus (so a model pretrained on it) held out.
    assert {r["source"] for r in records["validation"] if r["kind"] != "module_of"} <= {"fnmatch.py", "bisect.py"}
    # The test suite's functions are not asked about (its `test_...` names would swamp the rest).
    text = (STDLIB / "textwrap.py").read_text(encoding="utf-8")
    assert list(function_records("textwrap.py", text)) and not list(function_records("test/textwrap.py", text))
    assert not list(function_records("idlelib/idle_test/textwrap.py", text))
    # The kinds take turns, so any first records hold them alike.
    assert [r["kind"] for r in records["train"][:6]] == [*KINDS, *KINDS]


def test_records_are_valid_chats_that_fit_a_256_byte_row(records):
    for record in records["train"] + records["validation"]:
        user, assistant = record["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert user["content"].startswith(QUESTIONS[record["kind"]])
        assert 0 < len(assistant["content"].encode()) <= MAX_ANSWER_BYTES
        row = encode_example(json.dumps(record), "chat", lambda s: list(s.encode()), EOS, "completion", 256)
        assert row[257:].sum() == len(assistant["content"].encode()) + 1  # the answer and its EOS are scored


def test_answers_are_what_the_source_says(records):
    everything = records["train"] + records["validation"]
    texts = {path: (STDLIB / path).read_text(encoding="utf-8") for path in FILES}
    parsed = {path: list(outer_functions(ast.parse(text))) for path, text in texts.items()}
    segments = {path: {id(f): ast.get_source_segment(texts[path], f) for f in parsed[path]} for path in FILES}
    for record in everything:
        answer = record["messages"][1]["content"]
        payload = record["messages"][0]["content"].removeprefix(QUESTIONS[record["kind"]])
        text, functions = texts[record["source"]], parsed[record["source"]]
        if record["kind"] == "name_function":
            assert not re.search(rf"\b{re.escape(answer)}\b", payload)  # the name is hidden
            # The body, its name put back, is the code of a function of that name in that file.
            sources = [segments[record["source"]][id(f)] for f in functions if f.name == answer]
            restored = payload.replace(NAME_PLACEHOLDER, answer).splitlines()
            assert any(all(line.strip() in code for line in restored) for code in sources), (answer, payload)
        elif record["kind"] == "signature_from_docstring":
            match = [f for f in functions if ast.get_docstring(f) and payload in ast.get_docstring(f)]
            assert answer in {f"def {signature(f)}:" for f in match}, (answer, payload)
            assert isinstance(ast.parse(answer + " pass").body[0], ast.FunctionDef)
        else:
            assert answer == record["source"].split("/")[0] and package_label(record["source"]) is not None
            assert payload in text
    # A known method, TextWrapper.fill, written out by hand.
    asked = {(r["kind"], r["messages"][0]["content"], r["messages"][1]["content"]) for r in everything
             if r["source"] == "textwrap.py"}
    assert ("name_function", 'Name this function:\nreturn "\\n".join(self.wrap(text))', "fill") in asked
    assert ("signature_from_docstring", "Write the def line for this docstring:\nfill(text : string) -> string",
            "def fill(self, text):") in asked


def test_exact_match_of_rows_and_hand_made_predictions():
    chat = {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "yes"}]}
    row = encode_example(json.dumps(chat), "chat", lambda s: list(s.encode()), EOS, "completion", 32)
    example = completion_of_row(row, 32, EOS, "k")
    assert bytes(example.prompt).decode() == "<|user|>\nQ?\n<|assistant|>\n"
    assert bytes(example.answer).decode() == "yes" and example.kind == "k"
    rows = np.stack([row, np.zeros_like(row)])  # a row without scored tokens gives no example
    assert len(completions_of_rows(rows, 32, EOS, ["a", "b"], 5)) == 1

    scores = exact_match_scores(["a", "b ", "c", "x"], ["a", "b", "c", "d"], ["one", "one", "two", "two"])
    assert scores == {"eval_exact_match": 0.5, "eval_exact_match/one": 0.5, "eval_exact_match/two": 0.5}
    assert exact_match_scores(["a"], ["a"]) == {"eval_exact_match": 1.0}
    assert describe_exact_match(scores) == "exact match 0.500 (one 0.500, two 0.500)"


@pytest.mark.slow  # trains (about 15 s here)
def test_exact_match_per_kind_is_logged_and_rises_as_a_tiny_model_learns(tmp_path):
    rng = random.Random(2)
    replies = {"A": "alpha", "B": "bravo", "C": "charlie"}
    chats = []
    for _ in range(200):
        marker = rng.choice("ABC")
        noise = "".join(rng.choice("abcdefghij") for _ in range(8))
        chats.append({"messages": [{"role": "user", "content": f"{noise} {marker}"},
                                   {"role": "assistant", "content": replies[marker]}],
                      "kind": "first" if marker == "A" else "rest"})
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in chats))
    run = tmp_path / "run"
    assert main(["train", "gpt_tiny", f"run.dir={run}", f"data.source=jsonl:{path}", f"data.cache_dir={tmp_path / 'c'}",
                 "data.val_fraction=0.1", "train.seq_len=48", "train.steps=120", "train.eval_every=20",
                 "train.eval_exact_match=12", "optim.lr=1e-2", "train.sample_tokens=0", "checkpoint.every=0",
                 "train.tensorboard=false"]) == 0
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40, 60, 80, 100, 120]
    for r in evals:
        assert {"eval_exact_match", "eval_exact_match/first", "eval_exact_match/rest"} <= set(r), r
    assert evals[0]["eval_exact_match"] < 1.0 and evals[-1]["eval_exact_match"] == 1.0, evals


def test_exact_match_needs_completions(tmp_path):
    with pytest.raises(UserError, match="eval_exact_match"):
        load_config("gpt_tiny", ["train.eval_exact_match=4", "data.format=text"])
    assert main(["train", "gpt_tiny", f"run.dir={tmp_path / 'r'}", "train.eval_exact_match=4",
                 f"data.cache_dir={tmp_path / 'c'}"]) == 2  # stdlib text: nothing to complete


def test_the_preset_validates_and_a_missing_init_from_is_a_clear_error(tmp_path, capsys):
    cfg = resolve_format(load_config("instruct_stdlib"))
    assert cfg.data.format == "chat" and cfg.objective == "masked_causal" and cfg.train.eval_exact_match > 0
    assert cfg.checkpoint.init_from and cfg.model == load_config("gpt_small").model  # tunes a gpt_small run
    assert resolve_format(load_config("gpt_tiny", ["data.source=instruct:stdlib"])).data.format == "chat"
    with pytest.raises(UserError, match="instruction set of chat records"):
        load_config("gpt_tiny", ["data.source=instruct:stdlib", "data.format=text"])
    missing = tmp_path / "no_such_run"
    assert main(["train", "instruct_stdlib", f"run.dir={tmp_path / 'tuned'}", f"checkpoint.init_from={missing}",
                 f"data.cache_dir={tmp_path / 'c'}"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint.init_from: {missing} is not a directory" in err
    assert not (tmp_path / "c").exists()  # refused before any data was built
