"""The embedded arithmetic task: deterministic problems, disjoint splits, the shaped reward, and
its instruction set `data.source=instruct:arith` (prompt_completion records)."""

import json

import numpy as np
import pytest

from llm_jax.config import load_config
from llm_jax.data import arith, instruct
from llm_jax.data.build import build_data
from llm_jax.data.sft_rows import resolve_format
from llm_jax.errors import UserError


def test_problems_are_deterministic_right_and_distinct():
    first = arith.problems("train", 300, seed=3)
    assert first == arith.problems("train", 300, seed=3)
    assert arith.problems("train", 1000, seed=3)[:300] == first  # a longer list extends a shorter one
    assert first != arith.problems("train", 300, seed=4)
    assert len({p.prompt for p in first}) == 300
    for p in first:
        a, op, b = p.prompt[:-1].partition("+") if "+" in p.prompt else p.prompt[:-1].partition("-")
        assert p.prompt.endswith("=") and int(p.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert str(int(a)) == a and str(int(b)) == b and len(a) <= arith.MAX_DIGITS and len(b) <= arith.MAX_DIGITS
        assert p.kind == ("add" if op == "+" else "sub")
    assert {p.kind for p in first} == {"add", "sub"}
    assert any(p.answer.startswith("-") for p in first) and any(len(p.answer) == arith.MAX_DIGITS + 1 for p in first)
    assert arith.make_problem(37, "+", 485) == arith.Problem("37+485=", "522")
    assert arith.make_problem(12, "-", 85) == arith.Problem("12-85=", "-73")


def test_splits_are_disjoint_by_the_prompt_itself():
    train = {p.prompt for seed in (0, 1) for p in arith.problems("train", 3000, seed)}
    val = {p.prompt for seed in (0, 1) for p in arith.problems("validation", 500, seed)}
    assert not train & val
    assert all(arith.split_of(p) == "train" for p in train) and all(arith.split_of(p) == "validation" for p in val)
    with pytest.raises(UserError, match="unknown arith split 'test'"):
        arith.problems("test", 3)


@pytest.mark.parametrize("completion, expected", [
    ("522", 1.0),
    (" 522\n", 1.0),             # surrounding whitespace is not held against it
    ("512", 0.1 + 0.4 * 2 / 3),  # 5 and 2 right, aligned from the right
    ("523", 0.1 + 0.4 * 2 / 3),
    ("22", 0.1 + 0.4 * 2 / 3),   # units and tens right, a digit missing
    ("1522", 0.1 + 0.4 * 3 / 4),
    ("-522", 0.1 + 0.4 * 3 / 4),  # the sign is one more place
    ("0522", 0.1 + 0.4 * 3 / 4),  # leading zeros are not the answer
    ("999", 0.1),                # an integer, nothing right
    ("", 0.0), ("abc", 0.0), ("522 apples", 0.0), ("5 22", 0.0), ("52.2", 0.0), ("+522", 0.0),
])
def test_reward_by_hand(completion, expected):
    problem = arith.Problem("37+485=", "522")
    assert arith.reward(problem, completion) == pytest.approx(expected)
    assert arith.correct(problem, completion) == (expected == 1.0)


def test_reward_of_a_negative_answer_and_its_bounds():
    problem = arith.Problem("12-85=", "-73")
    assert arith.reward(problem, "-73") == 1.0
    assert arith.reward(problem, "73") == pytest.approx(0.1 + 0.4 * 2 / 3)
    assert arith.reward(problem, "-83") == pytest.approx(0.1 + 0.4 * 2 / 3)
    rewards = [arith.reward(problem, str(n)) for n in range(-200, 200) if n != -73]
    assert 0.1 <= min(rewards) and max(rewards) < 0.5  # a near miss is worth under half a right answer


def test_instruct_arith_is_a_prompt_completion_set_split_as_the_task(tmp_path, monkeypatch):
    monkeypatch.setattr(instruct, "ARITH_TRAIN", 40)
    monkeypatch.setattr(instruct, "ARITH_VALIDATION", 8)
    cfg = resolve_format(load_config("gpt_tiny", ["data.source=instruct:arith", f"data.cache_dir={tmp_path}",
                                                  "train.seq_len=16"]))
    assert cfg.data.format == "prompt_completion" and cfg.objective == "masked_causal"
    found = instruct.instruction_file("instruct:arith", cfg.data.val_fraction, tmp_path)
    records = [json.loads(line) for line in found.path.read_text().splitlines()]
    assert found.held_out == set(range(40, 48))
    assert records[:40] == [arith.record(p) for p in arith.problems("train", 40)]
    assert records[40:] == [arith.record(p) for p in arith.problems("validation", 8)]
    bundle = build_data(cfg, tmp_path / "run")
    assert bundle.train_tokens.shape == (40, 33) and bundle.val_tokens.shape == (8, 33)
    assert bundle.val_kinds == [p.kind for p in arith.problems("validation", 8)]
    first = arith.problems("train", 1)[0]
    row = np.asarray(bundle.train_tokens[0])
    ids = list((first.prompt + first.answer).encode()) + [256]
    assert row[:len(ids)].tolist() == ids
    weights = row[17:]  # weight j scores token j + 1: the answer and its EOS
    assert weights.tolist() == [0] * (len(first.prompt) - 1) + [1] * (len(first.answer) + 1) + \
        [0] * (16 - len(first.prompt) - len(first.answer))


def test_instruct_arith_refuses_other_formats():
    with pytest.raises(UserError, match="instruction set of prompt_completion records: use "
                                        "data.format=prompt_completion or auto, not chat"):
        load_config("gpt_tiny", ["data.source=instruct:arith", "data.format=chat"])
