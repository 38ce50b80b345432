"""RL with a KL penalty (llm_jax.alignment): PPO, GRPO, RLOO on a tiny GPT and a stand-in verifier.

The stand-in task ("say 7"): any prompt; the reward is the share of the completion's characters
that are the digit 7. A randomly initialised byte-level model says 7 about once in 256 tokens, so
a rising reward is the method learning, not luck.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import losses
from llm_jax.alignment import rewards
from llm_jax.alignment.prompts import PromptSet, jsonl_prompts, prompt_set
from llm_jax.alignment.rollout import completion_ids, forward, left_pad, response_mask, step_prompts
from llm_jax.alignment.run import rl_train
from llm_jax.alignment.setup import build_rl_setup, per_update
from llm_jax.alignment.steps import adapt_kl_coef
from llm_jax.cli import main
from llm_jax.config import load_config
from llm_jax.config.loader import dump_yaml
from llm_jax.data import arith
from llm_jax.data.tokenizer import ByteTokenizer
from llm_jax.errors import UserError
from llm_jax.parallel.mesh import make_mesh
from llm_jax.train.optim import make_schedule


def say_seven(prompts, completions) -> np.ndarray:
    return np.asarray([sum(c == "7" for c in text) / max(len(text), 1) for text in completions], np.float32)


rewards.VERIFIERS["say7"] = say_seven
rewards.VERIFIER_TRAIN_PROMPTS["say7"] = lambda count, seed: [f"t{i}:" for i in range(count)]
rewards.VERIFIER_PROMPTS["say7"] = lambda count: [f"v{i}:" for i in range(count)]

TINY_RL = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.d_ff=64", "train.seq_len=32",
           "rl.reward=say7", "rl.num_prompts=64", "rl.prompts_per_step=8", "rl.max_new_tokens=8",
           "train.log_every=1", "optim.lr=1e-2", "optim.warmup_steps=0", "optim.schedule=constant",
           "rl.epochs=2", "rl.minibatches=2", "train.tensorboard=false", "train.progress=false", "checkpoint.every=0"]


QUICK = ["rl.epochs=1", "rl.minibatches=1"]  # tests of one step's numbers: one update compiles fastest


def rl_cfg(method: str, *extra: str, run_dir: str = "runs/unused"):
    group = "1" if method == "ppo" else "4"
    head = ["model.score_head=true"] if method == "ppo" else []
    return load_config("gpt_tiny", [*TINY_RL, f"rl.method={method}", f"rl.group_size={group}", f"run.dir={run_dir}",
                                    *head, *extra])


def setup_on(cfg, devices: int):
    mesh = make_mesh(cfg, jax.devices()[:devices])
    prompts = PromptSet([f"t{i}:" for i in range(cfg.rl.num_prompts)], [], say_seven)
    setup = build_rl_setup(cfg, mesh, ByteTokenizer(), prompts, 512)
    state = setup.init_state()
    setup.ref_params = jax.tree.map(lambda a: a.copy(), state["params"])
    return setup, state


def test_response_mask_covers_completion_and_its_eos_only():
    eos = 9
    resp = jnp.asarray([[1, 2, eos, eos, eos], [3, 4, 5, 6, 7], [eos, eos, eos, eos, eos]])
    np.testing.assert_array_equal(response_mask(resp, eos), [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert completion_ids(np.asarray(resp), eos) == [[1, 2], [3, 4, 5, 6, 7], []]


@pytest.mark.slow
def test_prompt_padding_changes_no_response_logprob():
    """The rollout layout hides left padding: a row's response log-probs are the same at any
    prompt width (so neither padding nor the prompt enters the losses but through the mask)."""
    cfg = rl_cfg("grpo", *QUICK)
    setup, state = setup_on(cfg, 1)
    prompt, resp = [5, 6, 7], [8, 9, 10, 11]
    out = []
    for width in (3, 16):
        tokens, lengths = left_pad([prompt], width)
        tokens_BT = jnp.asarray(np.concatenate([tokens, [resp]], axis=1))
        logits, _ = jax.jit(lambda p, t, n, w=width: forward(setup.mdef, p, t, n, w, 1.0))(
            state["params"], tokens_BT, jnp.asarray(lengths))
        out.append(losses.token_logps(logits, jnp.asarray([resp])))
    np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_scoring_layout_predicts_what_the_sampler_drew():
    """Greedy rollouts: the argmax of the experience's logits at every completion position is the
    token the KV-cache sampler chose there (the scoring layout lines up with generation)."""
    cfg = rl_cfg("grpo", *QUICK)
    setup, state = setup_on(cfg, 1)
    rows = [setup.tokenizer.encode(p) for p in ("t1:", "t23:", "t4:", "t56:")]
    replicated = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
    resp, prompts, lengths = setup._sample(state["params"], rows, jax.random.key(0), 0.0, lambda nd: replicated)
    tokens_BT = jnp.asarray(np.concatenate([prompts, resp], axis=1))
    logits, _ = forward(setup.mdef, state["params"], tokens_BT, lengths, setup.width, 1.0, setup.tokenizer.vocab_size)
    mask = np.asarray(response_mask(jnp.asarray(resp), setup.tokenizer.eos_id))
    assert mask.sum() > len(rows)
    np.testing.assert_array_equal(np.where(mask > 0, np.asarray(logits.argmax(-1)), -1), np.where(mask > 0, resp, -1))


@pytest.mark.slow
def test_kl_to_reference_is_zero_at_the_first_step_and_grows():
    cfg = rl_cfg("rloo", *QUICK)
    setup, state = setup_on(cfg, 1)
    state, m0 = setup.step(state, 0)
    assert float(m0["kl"]) == 0.0  # policy == reference: the same forward pass, bit for bit
    _, m1 = setup.step(state, 1)
    assert float(m1["kl"]) != 0.0


def test_step_prompts_are_a_pure_function_of_seed_and_step():
    a = step_prompts(100, 4, 3, seed=1, step=7)
    np.testing.assert_array_equal(a, step_prompts(100, 4, 3, seed=1, step=7))
    assert len(a) == 12 and (a[0::3] == a[1::3]).all()  # each prompt's group in a row
    assert not np.array_equal(a, step_prompts(100, 4, 3, seed=1, step=8))


def test_adaptive_kl_controller_moves_towards_target():
    up = float(adapt_kl_coef(jnp.float32(0.1), jnp.float32(12.0), 100, target=6.0, horizon=1000))
    down = float(adapt_kl_coef(jnp.float32(0.1), jnp.float32(3.0), 100, target=6.0, horizon=1000))
    assert up == pytest.approx(0.1 * (1 + 0.2 * 0.1)) and down == pytest.approx(0.1 * (1 - 0.2 * 0.1))


@pytest.mark.slow
def test_losses_equal_on_1_and_8_devices():
    """Two GRPO steps (2 epochs x 2 minibatches) give the same metrics on 1 and 8 devices: the
    same samples (partitionable threefry keys from (seed, step)), the same updates."""
    cfg = rl_cfg("grpo")
    records = []
    for devices in (1, 8):
        setup, state = setup_on(cfg, devices)
        steps = []
        for s in range(2):
            state, m = setup.step(state, s)
            steps.append({k: float(v) for k, v in m.items() if not k.endswith("seconds")})
        records.append(steps)
    for one, eight in zip(*records):
        assert one.keys() == eight.keys()
        for k in one:
            assert one[k] == pytest.approx(eight[k], rel=1e-4, abs=1e-6), k


def test_unknown_reward_is_a_user_error(tmp_path):
    cfg = rl_cfg("grpo", "rl.reward=nope", run_dir=str(tmp_path / "r"))
    with pytest.raises(UserError, match="unknown reward 'nope'"):
        rl_train(cfg)


def test_grpo_needs_groups():
    with pytest.raises(UserError, match="rl.group_size >= 2"):
        load_config("gpt_tiny", ["rl.method=grpo", "rl.group_size=1"])


# (method, steps, overrides): the critic-free methods see 4 completions of each of 8 prompts; PPO
# one completion of each of 16 prompts and a heavier value loss. PPO and RLOO put the KL into the
# reward, where a random policy's KL noise would drown a score of ~0.004: a lighter KL weight.
LEARNING_RUNS = [("grpo", 12, []), ("rloo", 16, ["rl.kl_coef=0.01"]),
                 ("ppo", 16, ["rl.prompts_per_step=16", "rl.kl_coef=0.01", "rl.vf_coef=0.5"])]


@pytest.mark.slow
@pytest.mark.parametrize("method,steps,extra", LEARNING_RUNS, ids=[r[0] for r in LEARNING_RUNS])
def test_methods_raise_the_reward(tmp_path, method, steps, extra):
    """From ~0.004 (chance: one byte in 256 is '7') the mean reward of the last 3 steps reaches
    >= 0.05 (over 10x); the KL to the reference starts at exactly 0 and is reported."""
    cfg = rl_cfg(method, f"train.steps={steps}", *extra, run_dir=str(tmp_path / method))
    result = rl_train(cfg, mesh=make_mesh(cfg, jax.devices()[:1]))
    records = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    first, last = records[0]["reward"], np.mean([r["reward"] for r in records[-3:]])
    assert records[0]["kl"] == 0.0 and result["kl"] != 0.0
    assert last >= 0.05 and last > 5 * first
    assert {"entropy", "clip_frac", "response_len", "kl_coef", "gen_seconds", "update_seconds"} <= result.keys()
    if method == "ppo":
        assert result["value_loss"] >= 0


@pytest.mark.slow
def test_resume_logs_the_same_numbers(tmp_path):
    """3 steps straight, and 2 steps then a resume to 3 from the step-2 checkpoint: the same
    step-3 metrics (prompts, sampling keys and minibatch order all follow from (seed, step))."""
    def run(run_dir, steps):
        cfg = rl_cfg("rloo", *QUICK, f"train.steps={steps}", "checkpoint.every=1", "rl.adaptive_kl=true",
                     run_dir=str(run_dir))
        rl_train(cfg, mesh=make_mesh(cfg, jax.devices()[:1]))
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: {k: v for k, v in r.items() if not k.endswith("seconds")} for r in records}

    straight = run(tmp_path / "a", 3)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 3)
    assert resumed[3] == straight[3]
    assert resumed[3]["kl_coef"] != 0.05  # the adaptive coefficient came back from the checkpoint


@pytest.mark.slow
def test_cli_train_dispatches_to_the_rl_runner(tmp_path, capsys):
    """`llm-jax train` with rl.method set runs the RL runner (8 devices, data-parallel rollouts),
    evaluates greedy completions of held-out prompts at the end and checkpoints its last step."""
    args = ["train", "gpt_tiny", *TINY_RL, *QUICK, "rl.method=grpo", "rl.group_size=4", "train.steps=2",
            "rl.eval_prompts=4", f"run.dir={tmp_path / 'cli'}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "final: step 2, reward" in out and ", kl " in out and ", eval_reward " in out
    assert (tmp_path / "cli" / "checkpoints" / "2").is_dir()


def test_reward_model_prompts_come_from_prompt_completion_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}=", "completion": "a"}) + "\n" for i in range(40)))
    cfg = rl_cfg("grpo", "rl.reward=rm:somewhere", f"data.source=jsonl:{path}", "data.val_fraction=0.2")
    train, held_out = jsonl_prompts(cfg)
    assert sorted(train + held_out) == sorted(f"q{i}=" for i in range(40)) and held_out and len(train) > len(held_out)
    path.write_text(json.dumps({"prompt": "q="}) + "\n" + json.dumps({"completion": "a"}) + "\n")
    with pytest.raises(UserError, match=r"p.jsonl:2: no field 'prompt'"):
        jsonl_prompts(cfg)
    with pytest.raises(UserError, match="needs prompts: set data.source=jsonl:PATH"):
        jsonl_prompts(rl_cfg("grpo", "rl.reward=rm:somewhere"))


def test_resuming_with_other_prompts_or_reference_is_refused(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_yaml(rl_cfg("grpo", run_dir=str(run_dir))))
    with pytest.raises(UserError, match="rl.group_size: 4 -> 8"):
        rl_train(rl_cfg("grpo", "rl.group_size=8", run_dir=str(run_dir)))
    with pytest.raises(UserError, match="started from checkpoint.init_from='', the reference policy"):
        rl_train(rl_cfg("grpo", f"checkpoint.init_from={tmp_path}", run_dir=str(run_dir)))


def test_arith_reward_reads_the_problem_from_its_prompt():
    """rl.reward=arith: training prompts from the task's train split, scored by its verifier."""
    cfg = rl_cfg("grpo", "rl.reward=arith", "rl.num_prompts=32", "rl.eval_prompts=8")
    prompts = prompt_set(cfg)
    assert len(prompts.train) == 32 and len(prompts.held_out) == 8 and not set(prompts.train) & set(prompts.held_out)
    problem = arith.make_problem(37, "+", 48)
    np.testing.assert_allclose(prompts.reward_fn([problem.prompt] * 3, ["85", " 85 ", "86"]),
                               [1.0, 1.0, arith.reward(problem, "86")])
    with pytest.raises(UserError, match="a\\+b= or a-b="):
        prompts.reward_fn(["what is 2+2?"], ["4"])


def test_the_learning_rate_schedule_counts_optimiser_updates():
    # 4 steps x 2 epochs x 3 minibatches = 24 updates: warmup 6 of them, cosine down to min_lr at 24.
    cfg = load_config("grpo_arith", ["train.steps=4", "rl.epochs=2", "rl.minibatches=3", "rl.prompts_per_step=3",
                                     "optim.schedule=cosine", "optim.lr=1e-3", "optim.min_lr=1e-4",
                                     "optim.warmup_steps=6"])
    schedule = make_schedule(per_update(cfg))
    assert float(schedule(6)) == pytest.approx(1e-3)
    assert 1e-4 < float(schedule(12)) < 1e-3
    assert float(schedule(24)) == pytest.approx(1e-4)
    explicit = per_update(load_config("grpo_arith", ["optim.decay_steps=7"]))
    assert explicit.optim.decay_steps == 7
