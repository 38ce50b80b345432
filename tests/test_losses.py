"""The public loss functions (`llm_jax.losses`) against hand computations on fixed inputs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import losses


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


PC, PR, RC, RR = np.array([-3.0, -5.0]), np.array([-4.0, -2.0]), np.array([-3.5, -4.0]), np.array([-3.5, -3.0])
# h = (pc - pr) - (rc - rr) per pair
H = [(-3.0 + 4.0) - (-3.5 + 3.5), (-5.0 + 2.0) - (-4.0 + 3.0)]  # [1.0, -2.0]


@pytest.mark.parametrize("kind,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1), ("ipo", 0.0),
                                            ("hinge", 0.0)])
def test_dpo_kinds_equal_hand_computation(kind, smoothing):
    beta = 0.5
    out = np.asarray(losses.dpo(PC, PR, RC, RR, beta=beta, label_smoothing=smoothing, kind=kind))
    for i, h in enumerate(H):
        if kind == "sigmoid":
            want = -(1 - smoothing) * _logsig(beta * h) - smoothing * _logsig(-beta * h)
        elif kind == "robust":
            want = (-(1 - smoothing) * _logsig(beta * h) + smoothing * _logsig(-beta * h)) / (1 - 2 * smoothing)
        elif kind == "ipo":
            want = (h - 1 / (2 * beta)) ** 2
        else:
            want = max(0.0, 1 - beta * h)
        assert out[i] == pytest.approx(want, rel=1e-6), (kind, i)
    assert out.dtype == np.float32 and out.shape == (2,)


def test_dpo_at_the_reference_is_log_2_and_implicit_rewards_are_zero():
    out = losses.dpo(PC, PR, PC, PR, beta=0.1)
    np.testing.assert_allclose(out, [math.log(2)] * 2, rtol=1e-6)
    np.testing.assert_array_equal(losses.dpo_implicit_rewards(PC, PC, 0.1), [0.0, 0.0])
    np.testing.assert_allclose(losses.dpo_implicit_rewards(PC, RC, 0.1), 0.1 * (PC - RC), rtol=1e-6)


def test_bad_dpo_settings_are_refused():
    with pytest.raises(ValueError, match="kind 'kto'"):
        losses.dpo(PC, PR, RC, RR, kind="kto")
    with pytest.raises(ValueError, match="label_smoothing=0.5"):
        losses.dpo(PC, PR, RC, RR, label_smoothing=0.5)


def test_reward_pairwise_is_bradley_terry_with_margin():
    out = np.asarray(losses.reward_pairwise([2.0, -1.0], [0.5, 1.0], margin=[0.0, 1.0]))
    assert out[0] == pytest.approx(-_logsig(1.5), rel=1e-6)
    assert out[1] == pytest.approx(-_logsig(-3.0), rel=1e-6)


def test_token_logps_and_entropy():
    logits = np.array([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # p = [1/4, 3/4], [1/2, 1/2]
    np.testing.assert_allclose(losses.token_logps(logits, [[1, 0]]), [[math.log(0.75), math.log(0.5)]], rtol=1e-6)
    want = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    np.testing.assert_allclose(losses.token_entropy(logits), [[want, math.log(2)]], rtol=1e-6)


def test_kl_estimators():
    logp, ref = np.array([-1.0, -2.0]), np.array([-1.5, -1.0])
    d = logp - ref
    np.testing.assert_allclose(losses.kl_penalty(logp, ref, "k1"), d, rtol=1e-6)
    np.testing.assert_allclose(losses.kl_penalty(logp, ref, "k2"), 0.5 * d**2, rtol=1e-6)
    np.testing.assert_allclose(losses.kl_penalty(logp, ref, "k3"), np.exp(-d) - 1 + d, rtol=1e-6)
    np.testing.assert_allclose(losses.kl_penalty(logp, ref, "abs"), np.abs(d), rtol=1e-6)
    for kind in losses.KL_ESTIMATORS:  # zero at the reference
        np.testing.assert_array_equal(losses.kl_penalty(logp, logp, kind), [0.0, 0.0])


def _gae_loop(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    adv = np.zeros((B, T))
    for b in range(B):
        last = 0.0
        for t in reversed(range(T)):
            if not mask[b, t]:
                last = 0.0
                continue
            next_v = values[b, t + 1] if t + 1 < T and mask[b, t + 1] else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


def test_gae_equals_a_python_loop():
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    # Prompt (0) then response (1) then padding (0), as rollouts are laid out.
    mask = np.array([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0, 0]], np.float32)
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5)):
        adv, ret = losses.gae(rewards, values, mask, gamma, lam)
        want_adv, want_ret = _gae_loop(rewards, values, mask, gamma, lam)
        np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-6)


def test_ppo_clip_inside_and_outside_the_clip_range():
    logp_old = np.zeros((1, 4))
    # Ratios 1.1 (inside), 1.5 (above), 0.5 (below), 1.5 with the token masked out.
    logp_new = np.log([[1.1, 1.5, 0.5, 1.5]])
    adv = np.array([[1.0, 1.0, -1.0, 5.0]])
    mask = np.array([[1, 1, 1, 0]])
    # Per token: -A r = -1.1 (inside); max(-1.5, -1.2) = -1.2; A<0: max(0.5, 0.8) = 0.8.
    want = (-1.1 - 1.2 + 0.8) / 3
    assert float(losses.ppo_clip(logp_new, logp_old, adv, mask, clip=0.2)) == pytest.approx(want, rel=1e-5)
    assert float(losses.ppo_clip_fraction(logp_new, logp_old, mask, 0.2)) == pytest.approx(2 / 3)
    # Ratio 1 everywhere: the objective is -mean(A), nothing clipped.
    assert float(losses.ppo_clip(logp_old, logp_old, adv, mask)) == pytest.approx(-(1 + 1 - 1) / 3)
    assert float(losses.ppo_clip_fraction(logp_old, logp_old, mask)) == 0.0


def test_value_loss_clips_around_the_old_values():
    v, old, ret = np.array([[1.0, 0.0]]), np.array([[0.5, 0.0]]), np.array([[0.0, 1.0]])
    # Token 0: unclipped (1 - 0)^2 = 1, clipped 0.7^2 = 0.49 -> 1. Token 1: 1 and 1 -> 1.
    assert float(losses.value_loss(v, old, ret, np.ones((1, 2)), clip=0.2)) == pytest.approx(0.5)
    # Clipping can also make the loss larger: v moves towards the return past the clip.
    v2 = np.array([[0.0, 0.0]])
    # Token 0: unclipped 0, clipped (0.3 - 0)^2 = 0.09.
    assert float(losses.value_loss(v2, old, ret, np.array([[1, 0]]), clip=0.2)) == pytest.approx(0.5 * 0.09)


def test_group_advantages():
    r = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    grpo = np.asarray(losses.group_advantages(r, "grpo"))
    std = np.std(r[0], ddof=1)
    np.testing.assert_allclose(grpo[0], (r[0] - 0.5) / (std + 1e-4), rtol=1e-5)
    np.testing.assert_array_equal(grpo[1], 0.0)  # a group that agrees teaches nothing
    np.testing.assert_allclose(losses.group_advantages(r, "grpo", scale=False)[0], r[0] - 0.5)
    rloo = np.asarray(losses.group_advantages(r, "rloo"))
    np.testing.assert_allclose(rloo[0], [1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3], rtol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        losses.group_advantages(r[:, :1])


def test_whiten_and_masked_mean():
    x, mask = np.array([1.0, 2.0, 3.0, 100.0]), np.array([1, 1, 1, 0])
    assert float(losses.masked_mean(x, mask)) == pytest.approx(2.0)
    w = np.asarray(losses.whiten(x, mask))
    np.testing.assert_allclose(w[:3], [-1.0, 0.0, 1.0], rtol=1e-5)  # unbiased std of 1, 2, 3 is 1
    np.testing.assert_allclose(np.asarray(losses.whiten(x, mask, shift_mean=False))[:3], [1.0, 2.0, 3.0], rtol=1e-5)


def test_losses_run_under_jit_with_jax_arrays():
    f = jax.jit(lambda a, b: losses.dpo(a, b, a, b).sum() + losses.ppo_clip(a, b, a, jnp.ones_like(a)))
    assert np.isfinite(float(f(jnp.ones((2, 3)), jnp.zeros((2, 3)))))
