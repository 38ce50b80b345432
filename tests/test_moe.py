"""Mixture of Experts: routing and balancing losses against hand computations, capacity and
dropless dispatch against a per-token reference, expert parallelism on the 8-device mesh
against one device, and the config errors."""

from __future__ import annotations

import itertools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from runs import TINY, cli_subprocess, losses

from llm_jax.cli import main
from llm_jax.config import load_config
from llm_jax.models import grouped_mlp
from llm_jax.models import moe as moe_lib
from llm_jax.models.definition import model_def
from llm_jax.models.layers import activate
from llm_jax.models.stack import matmul_params
from llm_jax.train.moe_losses import moe_penalty, update_balance_bias

LOGITS = np.array([[2.0, 1.0, 0.5, -1.0],
                   [0.1, 0.3, 2.5, 0.2],
                   [-0.5, 1.5, 1.4, 0.0]], np.float32)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_routing_picks_top_k_and_renormalises():
    experts, gates, probs = moe_lib.route(jnp.asarray(LOGITS), 2, "softmax_topk", True)
    np.testing.assert_array_equal(experts, [[0, 1], [2, 1], [1, 2]])
    p = softmax(LOGITS)
    want = np.stack([p[i, e] / p[i, e].sum() for i, e in enumerate(np.asarray(experts))])
    np.testing.assert_allclose(gates, want, rtol=1e-6)
    np.testing.assert_allclose(probs, p, rtol=1e-6)
    # top-k then softmax: the same gates; without renormalisation the raw probabilities.
    _, gates2, _ = moe_lib.route(jnp.asarray(LOGITS), 2, "topk_softmax", True)
    np.testing.assert_allclose(gates2, want, rtol=1e-6)
    _, raw, _ = moe_lib.route(jnp.asarray(LOGITS), 2, "softmax_topk", False)
    np.testing.assert_allclose(raw, np.take_along_axis(p, np.asarray(experts), 1), rtol=1e-6)
    # A choice bias moves the choice, not the gates: expert 3 now wins every token.
    biased, bgates, _ = moe_lib.route(jnp.asarray(LOGITS), 1, "softmax_topk", False, jnp.array([0, 0, 0, 5.0]))
    np.testing.assert_array_equal(biased[:, 0], [3, 3, 3])
    np.testing.assert_allclose(bgates[:, 0], p[:, 3], rtol=1e-6)


def test_balancing_and_z_losses_equal_hand_computation():
    experts, _, probs = moe_lib.route(jnp.asarray(LOGITS), 2, "softmax_topk", True)
    p = softmax(LOGITS)
    # Assignments: expert 0 once, 1 three times, 2 twice, 3 never, out of 6.
    f = np.array([1, 3, 2, 0]) / 6
    np.testing.assert_allclose(moe_lib.expert_load(experts, 4), f)
    want_aux = 4 * sum(f[i] * p[:, i].mean() for i in range(4))
    np.testing.assert_allclose(moe_lib.balance_loss(probs, moe_lib.expert_load(experts, 4)), want_aux, rtol=1e-6)
    lse = np.log(np.exp(LOGITS.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(moe_lib.router_z_loss(jnp.asarray(LOGITS)), np.mean(lse ** 2), rtol=1e-6)
    # Uniform routing gives a balancing loss of exactly 1.
    uniform = jnp.zeros((8, 4))
    balanced_load = moe_lib.expert_load(jnp.arange(16).reshape(8, 2) % 4, 4)
    np.testing.assert_allclose(moe_lib.balance_loss(jax.nn.softmax(uniform), balanced_load), 1.0)
    stats = {"aux_loss": jnp.array([1.0, 3.0]), "z_loss": jnp.array([2.0, 4.0])}
    np.testing.assert_allclose(moe_penalty(stats, 0.01, 0.001), 0.01 * 2.0 + 0.001 * 3.0)


def test_capacity_slots_and_dropped_share_match_a_hand_count():
    # One sequence of 5 tokens, top-2 of 3 experts, 2 slots per expert.
    experts = np.array([[[0, 1], [0, 2], [0, 1], [1, 0], [2, 1]]])
    slots = np.asarray(moe_lib.slot_positions(jnp.asarray(experts), 3))
    # Top-1 choices queue first in token order (0,0,0,1,2), then the top-2 ones (1,2,1,0,1).
    np.testing.assert_array_equal(slots[0, :, 0], [0, 1, 2, 0, 0])
    np.testing.assert_array_equal(slots[0, :, 1], [1, 1, 2, 3, 3])
    capacity = 2
    queue: dict[int, int] = {}
    dropped = 0
    for k, t in itertools.product(range(2), range(5)):  # the hand count
        e = experts[0, t, k]
        dropped += queue.get(e, 0) >= capacity
        queue[e] = queue.get(e, 0) + 1
    assert dropped == 4
    assert np.mean(slots >= capacity) == dropped / 10


def moe_config(*overrides: str):
    return load_config("gpt_tiny", ["model.d_model=32", "model.num_heads=4", "model.moe.num_experts=4",
                                    "model.moe.expert_d_ff=48", "model.mlp=swiglu", *overrides])


def reference_moe(layer: moe_lib.MoE, x_BTD: np.ndarray) -> np.ndarray:
    """Per token, sum over its chosen experts of gate * expert MLP (no capacity)."""
    x = jnp.asarray(x_BTD).reshape(-1, x_BTD.shape[-1])
    experts, gates, _ = moe_lib.route(x @ layer.router[...], layer.top_k, layer.routing, layer.renormalize)
    w = layer.experts.weights()
    out = np.zeros_like(np.asarray(x))
    for n in range(x.shape[0]):
        for k in range(layer.top_k):
            e = int(experts[n, k])
            h = activate(layer.kind, x[n] @ w["up"][e], x[n] @ w["gate"][e])
            out[n] += float(gates[n, k]) * np.asarray(h @ w["down"][e])
    return out.reshape(x_BTD.shape)


@pytest.mark.parametrize("grouped", ["ragged_dot", "blocked", "looped"])
def test_dropless_equals_the_per_token_reference(grouped):
    cfg = moe_config(f"model.moe.grouped_matmul={grouped}")
    layer = moe_lib.MoE(cfg.model, rngs=nnx.Rngs(1), std=0.3, out_std=0.3)
    x = np.random.default_rng(0).normal(size=(3, 7, 32)).astype(np.float32)
    y, stats = layer(jnp.asarray(x))
    np.testing.assert_allclose(y, reference_moe(layer, x), atol=1e-5)
    assert float(stats["dropped"]) == 0.0
    # A gradient flows to every expert weight through the grouped matmul.
    grads = nnx.grad(lambda m: m(jnp.asarray(x))[0].sum())(layer)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(nnx.to_pure_dict(grads)["experts"]))


@pytest.mark.parametrize("kind", ["relu", "swiglu"])
def test_grouped_mlps_with_empty_and_oversized_groups(kind):
    """Blocks of a few rows: groups that are empty, span several blocks, and rows past the
    groups; the looped form (remainders in blocks of 1, 2 and 4 rows) and its hand-written
    backward pass against autodiff of ragged_dot."""
    rng = np.random.default_rng(3)
    w = {"up": jnp.asarray(rng.normal(size=(4, 8, 16)), jnp.float32),
         "down": jnp.asarray(rng.normal(size=(4, 16, 8)), jnp.float32)}
    if kind == "swiglu":
        w["gate"] = jnp.asarray(rng.normal(size=(4, 8, 16)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(23, 8)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(23, 8)), jnp.float32).at[20:].set(0)
    sizes = jnp.array([9, 0, 1, 10], jnp.int32)  # 20 rows in groups; the last 3 belong to none

    def reference(w, x):
        return moe_lib._expert_mlp(kind, w, x, sizes, "ragged_dot")

    want, want_vjp = jax.vjp(reference, w, x)
    want_dw, want_dx = want_vjp(dy)
    looped_tails = [partial(grouped_mlp.looped_mlp, tail=t) for t in (1, 2, 4)]  # 4: one pass of whole blocks
    for fn in (grouped_mlp.blocked_mlp, *looped_tails):
        got, got_vjp = jax.vjp(lambda w, x: fn(kind, w, x, sizes, block=4), w, x)
        np.testing.assert_allclose(got[:20], want[:20], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got[20:], 0)
        got_dw, got_dx = got_vjp(dy)
        np.testing.assert_allclose(got_dx[:20], want_dx[:20], rtol=1e-5, atol=1e-4)
        for k in w:
            np.testing.assert_allclose(got_dw[k], want_dw[k], rtol=1e-5, atol=1e-4, err_msg=f"{fn} d{k}")


def test_a_large_capacity_equals_dropless_and_a_small_one_drops():
    dropless = moe_lib.MoE(moe_config().model, rngs=nnx.Rngs(1), std=0.3, out_std=0.3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 32)), jnp.float32)
    want, _ = dropless(x)
    # capacity_factor = E / k gives every expert T slots: nothing can be dropped.
    roomy = moe_lib.MoE(moe_config("model.moe.capacity_factor=2").model, rngs=nnx.Rngs(1), std=0.3, out_std=0.3)
    got, stats = roomy(x)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert float(stats["dropped"]) == 0.0
    tight = moe_lib.MoE(moe_config("model.moe.capacity_factor=0.5").model, rngs=nnx.Rngs(1), std=0.3, out_std=0.3)
    got, stats = tight(x)
    experts, _, _ = moe_lib.route((x.reshape(-1, 32) @ tight.router[...]), 2, "softmax_topk", True)
    slots = moe_lib.slot_positions(experts.reshape(2, 16, 2), 4)
    capacity = moe_lib.expert_capacity(0.5, 2, 16, 4)  # 4 slots per expert and sequence
    assert capacity == 4
    hand = float(np.mean(np.asarray(slots) >= capacity))
    assert hand > 0 and float(stats["dropped"]) == pytest.approx(hand)
    assert not np.allclose(got, want, atol=1e-3)  # dropped assignments contribute nothing


MOE_RUN = [*TINY, "model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.d_ff=64",
           "train.batch_size=8", "train.seq_len=32", "train.steps=8", "optim.warmup_steps=2", "optim.lr=3e-3",
           "checkpoint.every=0", "model.moe.num_experts=4", "model.moe.top_k=2", "model.mlp=swiglu"]


@pytest.mark.slow
@pytest.mark.parametrize("mode,mesh", [
    # One device runs the looped grouped matmul (the CPU default), the mesh the blocked one.
    (["model.moe.capacity_factor=-1"], ["mesh.data=2", "mesh.expert=4", "model.moe.grouped_matmul=blocked"]),
    # Capacity mode with drops, fsdp + tensor + expert at once, and the optional pieces.
    (["model.moe.capacity_factor=0.5", "train.grad_accum=2", "model.moe.num_shared_experts=1",
      "model.moe.router_jitter=0.1", "model.moe.bias_update_rate=0.01", "model.moe.every=2", "model.num_layers=4"],
     ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"]),
    # An MoE encoder (masked LM) with an MoE block every second layer, dropless over fsdp + expert.
    (["model.arch=bert", "model.moe.every=2", "model.mlp=gelu"], ["mesh.data=2", "mesh.fsdp=2", "mesh.expert=2"]),
    # A Switch-style T5 (span corruption): MoE in both stacks, capacity mode in training.
    (["model.arch=t5", "model.position=relative", "model.norm=rmsnorm", "model.use_bias=false", "model.mlp=relu",
      "model.moe.capacity_factor=1.0", "optim.lr=1e-2"], ["mesh.data=2", "mesh.expert=4"]),
], ids=["dropless-ep4", "capacity-fsdp-tp-ep", "bert-every2-fsdp-ep2", "t5-capacity-ep4"])
def test_expert_parallel_training_equals_one_device(mode, mesh, tmp_path):
    args = [*MOE_RUN, *mode]
    single = cli_subprocess(["train", "gpt_tiny", f"run.dir={tmp_path / 'one'}", "mesh.data=1", *args], devices=1)
    assert main(["train", "gpt_tiny", f"run.dir={tmp_path / 'mesh'}", *mesh, *args]) == 0
    _, err = single.communicate(timeout=600)
    assert single.returncode == 0, err
    ref, got = losses(tmp_path / "one"), losses(tmp_path / "mesh")
    assert sorted(ref) == list(range(1, 9))
    np.testing.assert_allclose([got[s] for s in ref], list(ref.values()), rtol=1e-4)
    assert ref[8] < ref[1] - 0.1  # it learns
    import json

    records = [json.loads(line) for line in (tmp_path / "mesh" / "metrics.jsonl").read_text().splitlines()]
    stats = [r for r in records if "moe_load" in r]
    assert len(stats) == 8
    load = np.asarray(stats[-1]["moe_load"])
    assert load.shape[1] == 4 and np.allclose(load.sum(-1), 1.0)
    dropped = [r["moe_dropped"] for r in stats]
    capacity_mode = any(key.startswith("model.moe.capacity_factor=") and not key.endswith("=-1") for key in mode)
    assert (max(dropped) > 0) == capacity_mode
    if "model.arch=t5" in mode:  # the encoder's MoE layers, then the decoder's
        assert load.shape[0] == 4


def moe_step(mesh: list[str]) -> tuple[dict, str]:
    """The initial state of a tiny MoE GPT on `mesh` and its compiled train step's HLO text."""
    from llm_jax.parallel.mesh import make_mesh
    from llm_jax.train.objectives import Vocab, build_objective
    from llm_jax.train.setup import build_setup
    from llm_jax.train.state import init_state
    cfg = load_config("gpt_tiny", [*MOE_RUN, *mesh])
    setup = build_setup(cfg, 384, build_objective(cfg, Vocab(257, 384, 256)), make_mesh(cfg))
    state = init_state(cfg, setup.mdef, setup.mesh, setup.tx, setup.shardings)
    batch = setup.to_global(np.zeros((8, 33), np.int32))
    return state, setup.train_step.lower(state, batch).compile().as_text()


def test_expert_weights_are_split_and_tokens_move_by_all_to_all():
    state, hlo = moe_step(["mesh.data=2", "mesh.expert=4"])
    up = state["params"]["blocks"]["moe"]["experts"]["up"]  # [layers, E, D, F]
    assert up.shape[1] == 4
    assert {s.data.shape[1] for s in up.addressable_shards} == {1}  # one expert per device
    assert "all-to-all" in hlo


def test_data_parallel_moe_moves_no_tokens_between_devices():
    """With the batch split over `data` alone (experts replicated), routing and dispatch stay on
    each device's own rows: the compiled step gathers nothing (left to the partitioner, top_k
    gathered every row of router scores onto every device) and its only collectives are
    all-reduces (gradients, routing statistics)."""
    import re

    _, hlo = moe_step(["mesh.data=8"])
    collectives = set(re.findall(r"= [^=]*? (all-gather|all-to-all|collective-permute|all-reduce)(?:-start)?\(", hlo))
    assert collectives == {"all-reduce"}, collectives


def band_run(tmp_path, coef: float) -> np.ndarray:
    """Loads [logged steps >= 30, layers, experts] of a 60-step top-2-of-8 run on the stdlib corpus."""
    run = tmp_path / f"aux{coef}"
    assert main(["train", "moe_small", f"run.dir={run}", "model.num_layers=2", "model.d_model=64",
                 "train.seq_len=64", "train.batch_size=8", "train.steps=60", "train.log_every=5",
                 "train.eval_every=0", "train.sample_tokens=0", "checkpoint.every=0", "data.max_bytes=300000",
                 "optim.warmup_steps=10", "model.moe.capacity_factor=-1",
                 f"model.moe.aux_loss_coef={coef}"]) == 0
    import json

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return np.array([r["moe_load"] for r in records if "moe_load" in r and r["step"] >= 30])


@pytest.mark.slow
def test_balancing_keeps_expert_load_in_band(tmp_path):
    """With the balancing loss (coefficient 0.1), every expert's share of the assignments over
    steps 30-60 stays within [0.5, 1.5] x its fair share 1/8 (here 0.65-1.35);
    without it the router collapses onto a few experts (one gets more than 2.5/8, another almost
    none: here 4/8 and 0 from step 20 on)."""
    balanced = band_run(tmp_path, 0.1).mean(0) * 8
    assert balanced.shape == (2, 8)
    assert balanced.min() > 0.5 and balanced.max() < 1.5, balanced
    free = band_run(tmp_path, 0.0).mean(0) * 8
    assert free.max() > 2.5 and free.min() < 0.1, free


def test_balance_bias_moves_towards_balance():
    params = {"blocks": {"moe": {"balance_bias": jnp.zeros((2, 4)), "router": jnp.ones((2, 3, 4))}}}
    load = jnp.array([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]])
    new = update_balance_bias(params, load, 0.1)
    np.testing.assert_allclose(new["blocks"]["moe"]["balance_bias"], [[-0.1, 0, 0, 0.1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(new["blocks"]["moe"]["router"], params["blocks"]["moe"]["router"])


def test_mfu_counts_active_expert_parameters_only():
    cfg = load_config("moe_small", [])
    mdef = model_def(cfg, 384)
    experts = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(mdef.shapes["blocks"]["moe"]["experts"]))
    positions = int(np.prod(mdef.shapes["pos_embed"]["embedding"].shape))  # a lookup, not a matmul
    assert matmul_params(cfg, mdef.shapes) == mdef.num_params - positions - experts * 6 // 8


@pytest.mark.parametrize("overrides,message", [
    (["model.moe.num_experts=4", "model.moe.top_k=5"], "model.moe.top_k=5 exceeds model.moe.num_experts=4"),
    (["model.moe.num_experts=4", "model.moe.every=3"], "model.moe.every=3 does not divide model.num_layers=2"),
    (["model.moe.num_experts=4", "model.moe.capacity_factor=0"], "must be -1 (dropless) or positive"),
    (["model.moe.num_experts=6", "mesh.expert=4", "mesh.data=2"],
     "model.moe.num_experts=6 is not divisible by mesh.expert=4"),
    (["model.moe.num_experts=4", "model.arch=lstm"],
     "model.moe replaces a Transformer block's MLP; model.arch=lstm has none"),
    (["model.moe.num_experts=4", "model.moe.every=2", "model.arch=t5", "model.num_decoder_layers=3"],
     "model.moe.every=2 does not divide the 3 decoder layers"),
])
def test_config_errors_name_the_problem(overrides, message, tmp_path, capsys):
    assert main(["train", "gpt_tiny", f"run.dir={tmp_path / 'r'}", *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()
