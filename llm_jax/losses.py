"""Public loss functions of learning from preferences and rewards: DPO and its variants, the reward
model's pairwise loss, PPO's clipped objectives, GAE, KL estimators and group advantages.

Every function takes numpy or JAX arrays and returns float32 JAX arrays, so it runs inside a
jitted step or on its own. Shapes: B examples (pairs, rollouts), T token positions, G samples of
one prompt. `mask` arrays are 1 on the tokens that count (a response's tokens) and 0 on prompt and
padding; a token-level mean is over masked tokens only. Log-probabilities are of whole completions
(summed over their tokens) where a function speaks of `*_logps` of an example.

    dpo(pc, pr, rc, rr, beta=0.1, label_smoothing=0.0, kind="sigmoid")  per-example DPO losses
    reward_pairwise(r_chosen, r_rejected, margin=0.0)                     Bradley-Terry loss
    ppo_clip(logp_new, logp_old, advantages, mask, clip=0.2)              PPO's clipped surrogate
    gae(rewards, values, mask, gamma=1.0, lam=0.95)                       (advantages, returns)

References: Rafailov et al. 2023 (DPO), Azar et al. 2023 (IPO), Chowdhury et al. 2024 (robust DPO),
Mitchell 2023 (conservative DPO: label smoothing), Zhao et al. 2023 (SLiC, hinge); Schulman et al.
2017 (PPO), 2016 (GAE); Ouyang et al. 2022 and Ziegler et al. 2019 (KL-penalised RLHF); Schulman
2020 ("Approximating KL divergence": k1, k2, k3); Shao et al. 2024 (GRPO), Ahmadian et al. 2024 (RLOO).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import optax

ArrayLike = jax.typing.ArrayLike
DPO_KINDS = ("sigmoid", "robust", "ipo", "hinge")
KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


def _f32(x: ArrayLike) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def masked_sum(x: ArrayLike, mask: ArrayLike, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    """Sum of `x` where `mask` is 1."""
    return (_f32(x) * _f32(mask)).sum(axis)


def masked_mean(x: ArrayLike, mask: ArrayLike, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    """Mean of `x` over the positions `mask` selects (0 where it selects none)."""
    return masked_sum(x, mask, axis) / jnp.maximum(_f32(mask).sum(axis), 1.0)


def token_logps(logits_BTV: ArrayLike, targets_BT: ArrayLike) -> jax.Array:
    """log p(targets[b, t]) under logits[b, t] ([B, T]); shift beforehand so that the logits at
    t - 1 meet the token at t."""
    logits = _f32(logits_BTV)
    return -optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(targets_BT, jnp.int32))


def token_entropy(logits_BTV: ArrayLike) -> jax.Array:
    """Entropy of each position's next-token distribution [B, T] (nats)."""
    logp = jax.nn.log_softmax(_f32(logits_BTV), axis=-1)
    return -(jnp.exp(logp) * logp).sum(-1)


# ---------------------------------------------------------------- preferences


def dpo(policy_chosen_logps: ArrayLike, policy_rejected_logps: ArrayLike, ref_chosen_logps: ArrayLike,
        ref_rejected_logps: ArrayLike, beta: float = 0.1, label_smoothing: float = 0.0,
        kind: Literal["sigmoid", "robust", "ipo", "hinge"] = "sigmoid") -> jax.Array:
    """Per-example preference losses [B] from completion log-probabilities of the policy and the
    frozen reference. With h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected):

    - `sigmoid` (DPO): -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h); e = label_smoothing > 0
      is conservative DPO (labels flipped with probability e).
    - `robust` (Chowdhury et al.): (-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)) / (1 - 2e),
      an unbiased loss under label noise e < 0.5.
    - `ipo`: (h - 1 / (2 beta))^2. Its authors average each completion's log-probabilities over
      its tokens: pass length-normalised logps (sum / number of completion tokens) for IPO.
    - `hinge` (SLiC): max(0, 1 - beta h).
    """
    if kind not in DPO_KINDS:
        raise ValueError(f"dpo kind {kind!r}; choose one of {', '.join(DPO_KINDS)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 0.5)")
    h = (_f32(policy_chosen_logps) - _f32(policy_rejected_logps)) - (_f32(ref_chosen_logps)
                                                                      - _f32(ref_rejected_logps))
    agree, disagree = jax.nn.log_sigmoid(beta * h), jax.nn.log_sigmoid(-beta * h)
    if kind == "sigmoid":
        return -(1 - label_smoothing) * agree - label_smoothing * disagree
    if kind == "robust":
        return (-(1 - label_smoothing) * agree + label_smoothing * disagree) / (1 - 2 * label_smoothing)
    if kind == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return jax.nn.relu(1 - beta * h)


def dpo_implicit_rewards(policy_logps: ArrayLike, ref_logps: ArrayLike, beta: float = 0.1) -> jax.Array:
    """DPO's implicit reward of a completion, beta (log pi - log pi_ref) [B] (TRL's rewards/chosen)."""
    return beta * (_f32(policy_logps) - _f32(ref_logps))


def reward_pairwise(r_chosen: ArrayLike, r_rejected: ArrayLike, margin: ArrayLike = 0.0) -> jax.Array:
    """Bradley-Terry loss of a reward model per pair [B]: -log sigmoid(r_chosen - r_rejected - margin)
    (Llama 2's margin: how much better the chosen answer was rated)."""
    return -jax.nn.log_sigmoid(_f32(r_chosen) - _f32(r_rejected) - _f32(margin))


# ---------------------------------------------------------------- rewards and RL


def kl_penalty(logp: ArrayLike, ref_logp: ArrayLike,
               kind: Literal["k1", "k2", "k3", "abs"] = "k1") -> jax.Array:
    """Per-token estimate of KL(policy || reference) from sampled tokens' log-probabilities:
    k1 = logp - ref (unbiased, can be negative), k2 = (logp - ref)^2 / 2, k3 = exp(ref - logp) - 1 -
    (ref - logp) (unbiased and never negative), abs = |logp - ref|."""
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"KL estimator {kind!r}; choose one of {', '.join(KL_ESTIMATORS)}")
    d = _f32(logp) - _f32(ref_logp)
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d**2
    if kind == "k3":
        return jnp.expm1(-d) + d
    return jnp.abs(d)


def whiten(x: ArrayLike, mask: ArrayLike, shift_mean: bool = True) -> jax.Array:
    """(x - mean) / std over the masked positions (unbiased variance, as TRL); with shift_mean
    False the mean is added back (rewards keep their sign)."""
    x, mask = _f32(x), _f32(mask)
    n = jnp.maximum(mask.sum(), 1.0)
    mean = (x * mask).sum() / n
    var = (((x - mean) ** 2) * mask).sum() / jnp.maximum(n - 1, 1.0)
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def gae(rewards: ArrayLike, values: ArrayLike, mask: ArrayLike, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimates and returns [B, T] of per-token rewards and values.

    The trajectory of row b is its masked positions (a response: contiguous tokens); the value
    after its last token is 0 (the episode ends). delta_t = r_t + gamma V_{t+1} - V_t, A_t =
    delta_t + gamma lam A_{t+1}; returns = A + V. Unmasked positions get 0 in both.
    """
    rewards, values, mask = _f32(rewards), _f32(values), _f32(mask)

    def back(carry, xs):
        next_value, next_adv = carry
        r, v, m = xs
        delta = r + gamma * next_value - v
        adv = delta + gamma * lam * next_adv
        # Outside the trajectory nothing flows back: its successor value and advantage are 0.
        return (m * v, m * adv), m * adv

    zeros = jnp.zeros(rewards.shape[0], jnp.float32)
    _, adv_TB = jax.lax.scan(back, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
    advantages = adv_TB.T
    return advantages, (advantages + values) * mask


def ppo_clip(logp_new: ArrayLike, logp_old: ArrayLike, advantages: ArrayLike, mask: ArrayLike,
             clip: float = 0.2) -> jax.Array:
    """PPO's clipped surrogate as a loss to minimise: the mean over masked tokens of
    max(-A r, -A clip(r, 1 - clip, 1 + clip)), r = exp(logp_new - logp_old)."""
    ratio = jnp.exp(_f32(logp_new) - _f32(logp_old))
    adv = _f32(advantages)
    loss = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1 - clip, 1 + clip))
    return masked_mean(loss, mask)


def ppo_clip_fraction(logp_new: ArrayLike, logp_old: ArrayLike, mask: ArrayLike, clip: float = 0.2) -> jax.Array:
    """Share of masked tokens whose probability ratio left [1 - clip, 1 + clip]."""
    ratio = jnp.exp(_f32(logp_new) - _f32(logp_old))
    return masked_mean((jnp.abs(ratio - 1) > clip).astype(jnp.float32), mask)


def value_loss(values: ArrayLike, old_values: ArrayLike, returns: ArrayLike, mask: ArrayLike,
               clip: float = 0.2) -> jax.Array:
    """PPO's clipped value loss: 0.5 * mean over masked tokens of max((V - R)^2, (V_clipped - R)^2),
    V_clipped = V_old + clip(V - V_old, -clip, clip)."""
    values, old, returns = _f32(values), _f32(old_values), _f32(returns)
    clipped = old + jnp.clip(values - old, -clip, clip)
    return 0.5 * masked_mean(jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def group_advantages(rewards_BG: ArrayLike, kind: Literal["grpo", "rloo"] = "grpo", scale: bool = True) -> jax.Array:
    """Critic-free advantages of G samples per prompt [B, G] (G >= 2).

    grpo: r minus its group's mean, divided by the group's standard deviation (sample std, plus
    1e-4) when `scale` (False: Dr. GRPO's unscaled version). rloo: r minus the mean of the group's
    other G - 1 rewards (leave-one-out baseline)."""
    r = _f32(rewards_BG)
    G = r.shape[-1]
    if G < 2:
        raise ValueError(f"group advantages need at least 2 samples per prompt, got {G}")
    if kind == "rloo":
        return r - (r.sum(-1, keepdims=True) - r) / (G - 1)
    if kind != "grpo":
        raise ValueError(f"group advantage kind {kind!r}; choose grpo or rloo")
    centred = r - r.mean(-1, keepdims=True)
    if not scale:
        return centred
    return centred / (r.std(-1, ddof=1, keepdims=True) + 1e-4)
