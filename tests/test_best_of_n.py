"""Reward-model scores (`Model.score`) and best-of-N sampling (`alignment.best_of_n`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_jax.alignment.best_of_n import best_of_n
from llm_jax.alignment.rewards import scorer_of
from llm_jax.config import load_config
from llm_jax.data.tokenizer import ByteTokenizer
from llm_jax.errors import UserError
from llm_jax.inference.api import Model
from llm_jax.models.base import build_model

TINY = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "train.seq_len=128"]


def _model(score_head: bool) -> Model:
    tok = ByteTokenizer()
    cfg = load_config("gpt_tiny", TINY + [f"model.score_head={str(score_head).lower()}"])
    net = build_model(cfg, 264, nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(net))
    if score_head:  # a head that is not zero, so scores tell texts apart
        kernel = params["score_head"]["kernel"]
        params["score_head"]["kernel"] = jax.random.normal(jax.random.key(1), kernel.shape)
    return Model.from_params(cfg, params, tokenizer=tok)


def test_score_is_the_head_at_the_eos_after_the_completion_whatever_the_batch():
    model = _model(score_head=True)
    tok = model.tokenizer
    prompts, completions = ["12+3=", "a much longer prompt than the first one: "], ["15", "x" * 40]
    scores = model.score(prompts, completions)
    for p, c, got in zip(prompts, completions, scores):
        ids = tok.encode(p) + tok.encode(c) + [tok.eos_id]
        graphdef, params = model._mdef.graphdef, model.params
        want = nnx.merge(graphdef, params)(jnp.asarray([ids], jnp.int32)).aux["score"][0, -1]
        assert got == pytest.approx(float(want), rel=1e-5, abs=1e-6)
    # Alone or next to a longer row (padding), a text scores the same.
    assert model.score(prompts[:1], completions[:1])[0] == pytest.approx(scores[0], rel=1e-5, abs=1e-6)
    assert scores[0] != pytest.approx(scores[1])


def test_score_needs_a_score_head_and_matching_lengths():
    with pytest.raises(UserError, match="has no score head"):
        _model(score_head=False).score(["a"], ["b"])
    with pytest.raises(UserError, match="1 prompts but 2 completions"):
        _model(score_head=True).score(["a"], ["b", "c"])
    with pytest.raises(UserError, match="unknown reward 'nope'"):
        scorer_of("nope")


def test_best_of_n_keeps_the_highest_scoring_sample_and_more_samples_never_score_worse():
    model = _model(score_head=False)

    def count_digits(prompts, completions):  # a stand-in verifier: share of digits in the completion
        return np.array([sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions], np.float32)

    result = best_of_n(model, ["1+1=", "22+7="], n=8, scorer=count_digits, max_new_tokens=6, temperature=1.0, seed=3)
    assert result.scores.shape == (2, 8) and len(result.samples[0]) == 8
    for i in range(2):
        np.testing.assert_allclose(result.scores[i], count_digits(None, result.samples[i]))
        assert count_digits(None, [result.best[i]])[0] == result.scores[i].max()
    curve = [result.mean_best(k) for k in (1, 2, 4, 8)]
    assert curve == sorted(curve) and curve[0] == pytest.approx(result.scores[:, 0].mean())
    again = best_of_n(model, ["1+1=", "22+7="], n=8, scorer=count_digits, max_new_tokens=6, temperature=1.0, seed=3)
    assert again.samples == result.samples  # same seed, same draws
    with pytest.raises(UserError, match="temperature 0"):
        best_of_n(model, ["1+1="], n=4, scorer=count_digits, temperature=0.0)


@pytest.mark.slow
def test_best_of_n_command_reports_the_curve_and_never_overwrites(tmp_path, capsys):
    import json

    from llm_jax.alignment import rewards
    from llm_jax.cli import main

    run = tmp_path / "run"
    assert main(["train", "gpt_tiny", f"run.dir={run}", "train.steps=2", "train.sample_tokens=0", "train.seq_len=32",
                 "model.num_layers=1", "model.d_model=32", "model.num_heads=2", "data.max_bytes=200000"]) == 0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "def "}\n{"prompt": "import "}\n')
    rewards.VERIFIERS["digits"] = lambda p, c: np.array([sum(ch.isdigit() for ch in x) for x in c], np.float32)
    try:
        capsys.readouterr()
        out = tmp_path / "best.jsonl"
        assert main(["best-of-n", str(run), "--reward", "digits", "--n", "4,1", "--prompts", str(prompts),
                     "--max-new-tokens", "8", "--json", "--out", str(out)]) == 0
        report = json.loads(capsys.readouterr().out)
        assert [c["n"] for c in report["curve"]] == [1, 4] and report["prompts"] == 2
        assert report["curve"][1]["mean_reward"] >= report["curve"][0]["mean_reward"]
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["prompt"] for r in records] == ["def ", "import "]
        assert main(["best-of-n", str(run), "--reward", "digits", "--prompts", str(prompts), "--out", str(out)]) == 2
        assert "exists" in capsys.readouterr().err
        assert main(["best-of-n", str(run), "--reward", "digits"]) == 2
        assert "give --prompts FILE" in capsys.readouterr().err
    finally:
        del rewards.VERIFIERS["digits"]


def test_logprobs_sum_the_completion_tokens_whatever_the_padding():
    model = _model(score_head=False)
    tok = model.tokenizer
    prompts, completions = ["12+3=", "a longer prompt: "], ["15", "abc" + chr(0)]
    got = model.logprobs(prompts, [tok.encode(c) for c in completions])
    for p, c, g in zip(prompts, completions, got):
        ids = tok.encode(p) + tok.encode(c)
        logits = np.asarray(model.logits(ids))[0]
        logp = jax.nn.log_softmax(logits, axis=-1)
        want = sum(float(logp[t - 1, ids[t]]) for t in range(len(tok.encode(p)), len(ids)))
        assert g == pytest.approx(want, rel=1e-4)
    assert model.logprobs(prompts[:1], completions[:1])[0] == pytest.approx(got[0], rel=1e-5)
    with pytest.raises(UserError, match="non-empty prompt"):
        model.logprobs([""], ["x"])


def test_evaluate_policy_reports_zero_kl_to_itself_and_the_scorer_mean():
    from llm_jax.alignment.evaluate import evaluate_policy

    model = _model(score_head=False)

    def length(prompts, completions):
        return np.array([min(len(c), 4) / 4 for c in completions], np.float32)

    ev = evaluate_policy(model, model, ["1+1=", "2+2="], length, samples=2, max_new_tokens=4, seed=0)
    assert ev["kl"] == 0.0
    assert 0.0 <= ev["reward"] <= 1.0 and ev["response_len"] <= 4
    moved = jax.tree.map(lambda a: a * 1.5, model.params)  # another policy of the same shape
    other = Model.from_params(model.config, moved, tokenizer=model.tokenizer)
    assert evaluate_policy(other, model, ["1+1="], length, samples=4, max_new_tokens=4)["kl"] != 0.0
