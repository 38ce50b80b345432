"""Reward models and DPO as objectives of the ordinary train step, on a tiny preference task built
by hand in the preference row layout: a prompt of random ids, then a chosen completion of even
ids and a rejected one of odd ids (so which is preferred is learnable from the completion alone)."""

import dataclasses
import math

import jax
import numpy as np
import pytest

from llm_jax.config import load_config
from llm_jax.errors import UserError
from llm_jax.parallel.mesh import make_mesh
from llm_jax.runtime.checkpoint import Checkpointer
from llm_jax.train.objectives import Vocab, build_objective
from llm_jax.train.objectives.preference import last_scored_input, pair_data
from llm_jax.train.setup import build_setup
from llm_jax.train.state import init_state

EOS = 256
SEQ_LEN = 12
W = SEQ_LEN + 1
PAIRS = ["data.format=preference", "data.source=jsonl:pairs.jsonl", f"train.seq_len={SEQ_LEN}",
         "train.batch_size=8", "optim.warmup_steps=2", "optim.lr=3e-3", "checkpoint.every=0"]


def completion_row(prompt: list[int], completion: list[int]) -> np.ndarray:
    """[2W]: tokens (prompt, completion, EOS, padded with EOS), then the mask of the scored ones."""
    tokens = np.full(W, EOS, np.int32)
    mask = np.zeros(W, np.int32)
    ids = prompt + completion + [EOS]
    tokens[:len(ids)] = ids
    mask[len(prompt):len(ids)] = 1
    return np.concatenate([tokens, mask])


def pair_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n, 4W] pairs: chosen completions of even ids, rejected ones of odd ids, lengths varying."""
    rows = []
    for _ in range(n):
        prompt = rng.integers(0, 16, rng.integers(2, 6)).tolist()
        length = int(rng.integers(2, 5))
        chosen = (2 * rng.integers(0, 8, length)).tolist()
        rejected = (2 * rng.integers(0, 8, length) + 1).tolist()
        rows.append(np.concatenate([completion_row(prompt, chosen), completion_row(prompt, rejected)]))
    return np.stack(rows)


def preference_setup(overrides: list[str], devices: int = 8):
    cfg = load_config("gpt_tiny", [*PAIRS, *overrides])
    setup = build_setup(cfg, 384, build_objective(cfg, Vocab(257, 384, EOS)), make_mesh(cfg, jax.devices()[:devices]))
    return setup, init_state(cfg, setup.mdef, setup.mesh, setup.tx, setup.shardings)


def train(setup, state, steps: int, seed: int = 0) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    history = []
    for _ in range(steps):
        state, metrics = setup.train_step(state, setup.to_global(pair_rows(rng, 8)))
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history


def held_out(setup, state) -> tuple[float, float]:
    """(loss per pair, share of pairs ranked right) on 32 fixed held-out pairs."""
    rows = pair_rows(np.random.default_rng(123), 32)
    reference = (state["ref_params"],) if "ref_params" in state else ()
    total = count = hits = 0.0
    for batch in np.split(rows, 4):
        s, c, h = setup.eval_step(state["params"], setup.to_global(batch), *reference)
        total, count, hits = total + float(s), count + float(c), hits + float(h)
    return total / count, hits / count


def test_rows_become_interleaved_pairs_scored_on_completion_and_eos_only():
    rows = np.stack([np.concatenate([completion_row([5, 6, 7], [2, 4]), completion_row([5, 6, 7], [3])])])
    inputs, targets, weights = pair_data(rows, W)
    np.testing.assert_array_equal(inputs["tokens_BT"][:, :5], [[5, 6, 7, 2, 4], [5, 6, 7, 3, EOS]])
    np.testing.assert_array_equal(targets[:, :5], [[6, 7, 2, 4, EOS], [6, 7, 3, EOS, EOS]])
    # Target j is token j + 1: prompt and padding are never scored.
    np.testing.assert_array_equal(weights, [[0, 0, 1, 1, 1] + [0] * 7, [0, 0, 1, 1] + [0] * 8])
    # The reward is read where the final EOS is an input; a full window's EOS is read one earlier.
    np.testing.assert_array_equal(last_scored_input(weights), [5, 4])
    full = np.zeros((1, SEQ_LEN), np.float32)
    full[0, -3:] = 1
    assert int(last_scored_input(full)[0]) == SEQ_LEN - 1


def test_objective_follows_pref_method_and_checks_the_model():
    assert load_config("gpt_tiny", PAIRS).objective == "dpo"
    assert load_config("gpt_tiny", [*PAIRS, "pref.method=reward", "model.score_head=true"]).objective == "reward"
    with pytest.raises(UserError, match="model.score_head=true"):
        load_config("gpt_tiny", [*PAIRS, "pref.method=reward"])
    with pytest.raises(UserError, match="data.format=preference trains a decoder"):
        load_config("bert_small", [*PAIRS])
    with pytest.raises(UserError, match="pref.label_smoothing"):
        load_config("gpt_tiny", [*PAIRS, "pref.label_smoothing=0.5"])


def test_dpo_losses_at_step_0_where_policy_is_reference():
    """Policy == reference: every implicit reward (beta times the log-ratio, whose mean over the
    policy's samples is the KL to the reference) is 0, so sigmoid DPO is log 2 exactly (robust
    too, whatever its label smoothing), IPO (0 - 1/(2 beta))^2 and hinge 1."""
    setup, state = preference_setup(["mesh.data=1"], devices=1)
    inputs, targets, weights = setup.objective.data(pair_rows(np.random.default_rng(0), 8), 0)
    forward = jax.jit(lambda params: setup.mdef.merge(params)(**inputs))
    out, ref_out = forward(state["params"]), forward(state["ref_params"])
    expected = {"sigmoid": math.log(2), "robust": math.log(2), "ipo": 1 / (4 * 0.1**2), "hinge": 1.0}
    for kind, step0 in expected.items():
        variant = dataclasses.replace(setup.objective, kind=kind, label_smoothing=0.2 if kind == "robust" else 0.0)
        with_ref = variant.add_reference(ref_out, targets, weights)
        total, count = variant.loss(out, with_ref, weights, train=True)
        assert count == 8
        np.testing.assert_allclose(total / count, step0, rtol=1e-6, err_msg=kind)
        metrics = variant.metrics(out, with_ref, weights)
        assert [metrics[f"rewards/{k}"] for k in ("chosen", "rejected", "margin", "accuracy")] == [0] * 4, kind
        assert variant.hits(out, with_ref, weights) == 0  # ties are not ranked right
    # RPO adds the chosen completions' NLL per token, here recomputed from the logits by hand.
    rpo = dataclasses.replace(setup.objective, rpo_alpha=0.5)
    logp_NT = np.asarray(jax.nn.log_softmax(out.logits, axis=-1))
    logp_NT = np.take_along_axis(logp_NT, np.asarray(targets["tokens"])[..., None], axis=-1)[..., 0]
    nll_B = -((logp_NT * weights).sum(1) / weights.sum(1))[0::2]
    total, count = rpo.loss(out, rpo.add_reference(ref_out, targets, weights), weights, train=True)
    np.testing.assert_allclose(total / count, math.log(2) + 0.5 * nll_B.mean(), rtol=1e-5)


@pytest.mark.slow
def test_dpo_raises_preference_accuracy_and_margin():
    setup, state = preference_setup(["pref.beta=0.1"])
    loss0, accuracy0 = held_out(setup, state)
    assert loss0 == pytest.approx(math.log(2), rel=1e-6) and accuracy0 == 0.0  # ties count as wrong
    state, history = train(setup, state, 30)
    # The train step's first metrics: policy == reference.
    assert history[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert history[0]["rewards/margin"] == history[0]["rewards/chosen"] == 0.0
    loss, accuracy = held_out(setup, state)
    assert accuracy >= 0.9 and loss < 0.5 * math.log(2), (accuracy, loss)
    assert history[-1]["rewards/margin"] > 1.0 and history[-1]["rewards/accuracy"] >= 0.9
    # The reference never moved: it is still the initial parameters.
    np.testing.assert_array_equal(jax.tree.leaves(state["ref_params"])[0],
                                  jax.tree.leaves(preference_setup(["pref.beta=0.1"])[1]["ref_params"])[0])


@pytest.mark.slow
def test_reward_model_learns_to_rank_pairs():
    setup, state = preference_setup(["pref.method=reward", "model.score_head=true", "pref.center_coef=0.01"])
    loss0, accuracy0 = held_out(setup, state)
    state, history = train(setup, state, 30)
    loss, accuracy = held_out(setup, state)
    assert accuracy >= 0.9 > accuracy0 and loss < loss0 - 0.3, (accuracy0, accuracy, loss0, loss)
    assert history[-1]["rewards/margin"] > history[0]["rewards/margin"] + 1.0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "reward"])
def test_same_losses_on_one_device_and_on_eight_with_accumulation(method):
    """One device against data=2, fsdp=2, tensor=2 with two microbatches of 4 pairs: the same
    losses and metrics (pairs stay whole in every split)."""
    over = ["pref.method=reward", "model.score_head=true", "pref.center_coef=0.01"] if method == "reward" else []
    one = train(*preference_setup([*over, "mesh.data=1"], devices=1), 3)[1]
    mesh = train(*preference_setup([*over, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.grad_accum=2"]),
                 3)[1]
    assert one[-1]["loss"] != one[0]["loss"]
    for ref, got in zip(one, mesh):
        for key in ("loss", "rewards/margin", "rewards/accuracy"):
            np.testing.assert_allclose(got[key], ref[key], rtol=2e-4, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_checkpoint_holds_the_reference_and_resumes_exactly(tmp_path):
    setup, state = preference_setup([f"run.dir={tmp_path}", "mesh.data=1"], devices=1)
    state, _ = train(setup, state, 2)
    ckpt = Checkpointer(tmp_path, setup.cfg)
    ckpt.save(2, state, {"next_step": 2}, setup.cfg, force=True)
    ckpt.wait()
    restored, _ = ckpt.restore(2, setup.abstract_state())
    ckpt.close()
    assert set(restored) == {"params", "opt_state", "step", "ref_params"}
    _, straight = train(setup, state, 2, seed=1)
    _, resumed = train(setup, restored, 2, seed=1)
    assert [h["loss"] for h in straight] == [h["loss"] for h in resumed]


@pytest.mark.slow
def test_bench_times_the_dpo_step_with_its_reference():
    """`llm-jax bench` lowers and compiles the step with the reference (`step.ReferenceStep`);
    tokens count both completions of a pair, FLOPs the reference's forward pass too."""
    from llm_jax.train.bench import bench

    cfg = load_config("gpt_tiny", [*PAIRS, "bench.steps=2", "bench.warmup=1", "mesh.data=8"])
    result = bench(cfg)
    plain = build_setup(load_config("gpt_tiny", [f"train.seq_len={SEQ_LEN}"]), 384,
                        build_objective(load_config("gpt_tiny", [f"train.seq_len={SEQ_LEN}"]), Vocab(257, 384, EOS)))
    assert result["flops_per_token"] == pytest.approx(plain.flops_per_token * 4 / 3)
    assert result["tokens_per_s"] == pytest.approx(result["steps_per_s"] * 8 * SEQ_LEN * 2)
    assert math.isfinite(result["loss"])
