"""The two jitted halves of an RL step after sampling: `experience` (log-probabilities of the
rollout under the policy and the frozen reference, values, KL, rewards and advantages) and
`update` (rl.epochs passes of rl.minibatches clipped-policy minibatches, one optimiser update each,
in one `lax.scan`).

PPO (Ouyang et al. 2022; TRL's reference implementation): per-token reward -kl_coef * KL(t) with
the score added at the completion's last token (its EOS), GAE over the value head's values,
whitened advantages, clipped policy loss + vf_coef * clipped value loss.
GRPO (Shao et al. 2024): G completions per prompt, advantage (score - group mean) / group std on
every token, k3 KL to the reference in the loss (weight kl_coef).
RLOO (Ahmadian et al. 2024): reward score - kl_coef * sequence KL, baseline the mean of the other
G-1 completions' rewards, the same clipped loss.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax import losses
from llm_jax.alignment.rollout import forward, rows_sharding
from llm_jax.config import Config
from llm_jax.models.definition import ModelDef
from llm_jax.parallel.rules import activation_mesh
from llm_jax.train.nonfinite import nonfinite_flag
from llm_jax.train.optim import clip_by_norm


def adapt_kl_coef(kl_coef: jax.Array, kl: jax.Array, batch: int, target: float, horizon: int) -> jax.Array:
    """Ziegler et al.'s proportional controller: move the coefficient by at most 20% of batch/horizon."""
    error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
    return kl_coef * (1.0 + error * batch / horizon)


def make_experience(cfg: Config, mdef: ModelDef, mesh: Mesh, prompt_width: int, vocab_limit: int) -> Callable:
    """experience(params, ref_params, kl_coef, batch) -> (exp, metrics); batch holds tokens_BT,
    lengths_B, mask_BN and scores_B."""
    rl = cfg.rl
    G = rl.group_size

    def experience(params: dict, ref_params: dict, kl_coef: jax.Array, batch: dict) -> tuple[dict, dict]:
        with activation_mesh(mesh):
            tokens_BT, lengths_B, mask_BN, scores_B = (batch[k] for k in ("tokens_BT", "lengths_B", "mask_BN",
                                                                          "scores_B"))
            resp_BN = tokens_BT[:, prompt_width:]
            logits_BNV, values_BN = forward(mdef, params, tokens_BT, lengths_B, prompt_width, rl.temperature,
                                            vocab_limit)
            ref_logits_BNV, _ = forward(mdef, ref_params, tokens_BT, lengths_B, prompt_width, rl.temperature,
                                          vocab_limit)
            logps_BN = losses.token_logps(logits_BNV, resp_BN)
            ref_logps_BN = losses.token_logps(ref_logits_BNV, resp_BN)
            kl_B = losses.masked_sum(losses.kl_penalty(logps_BN, ref_logps_BN, "k1"), mask_BN, axis=1)
            penalty_BN = losses.kl_penalty(logps_BN, ref_logps_BN, rl.kl_estimator) * mask_BN
            exp = {"tokens_BT": tokens_BT, "lengths_B": lengths_B, "mask_BN": mask_BN, "logps_BN": logps_BN,
                   "ref_logps_BN": ref_logps_BN}
            if rl.method == "ppo":
                last_BN = jax.nn.one_hot(mask_BN.sum(1).astype(jnp.int32) - 1, mask_BN.shape[1])
                rewards_BN = -kl_coef * penalty_BN + last_BN * scores_B[:, None]
                values_BN = jax.lax.stop_gradient(values_BN) * mask_BN
                adv_BN, returns_BN = losses.gae(rewards_BN, values_BN, mask_BN, gamma=rl.gamma, lam=rl.lam)
                if rl.whiten:
                    adv_BN = losses.whiten(adv_BN, mask_BN)
                exp.update(values_BN=values_BN, returns_BN=returns_BN)
            else:
                seq_B = scores_B if rl.method == "grpo" else scores_B - kl_coef * penalty_BN.sum(1)
                adv_B = losses.group_advantages(seq_B.reshape(-1, G), kind=rl.method, scale=rl.whiten).reshape(-1)
                if rl.method == "rloo" and rl.whiten:  # TRL's normalize_advantage: over the whole batch
                    adv_B = losses.whiten(adv_B, jnp.ones_like(adv_B))
                adv_BN = adv_B[:, None] * jnp.ones_like(mask_BN)
            exp["adv_BN"] = adv_BN * mask_BN
            metrics = {"reward": scores_B.mean(), "kl": kl_B.mean(),
                       "entropy": losses.masked_mean(losses.token_entropy(logits_BNV), mask_BN),
                       "response_len": mask_BN.sum(1).mean()}
            return exp, metrics

    replicated = NamedSharding(mesh, P())
    return jax.jit(experience, out_shardings=(None, replicated))


def make_update(cfg: Config, mdef: ModelDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                mesh: Mesh, shardings: dict, prompt_width: int, vocab_limit: int) -> Callable:
    """update(state, exp, kl) -> (state, metrics): the state {params, opt_state, step, kl_coef} is donated."""
    rl = cfg.rl
    base_key = jax.random.key(cfg.seed)

    def loss_fn(params: dict, kl_coef: jax.Array, mb: dict) -> tuple[jax.Array, dict]:
        logits_BNV, values_BN = forward(mdef, params, mb["tokens_BT"], mb["lengths_B"], prompt_width,
                                        rl.temperature, vocab_limit)
        mask_BN = mb["mask_BN"]
        logps_BN = losses.token_logps(logits_BNV, mb["tokens_BT"][:, prompt_width:])
        pg = losses.ppo_clip(logps_BN, mb["logps_BN"], mb["adv_BN"], mask_BN, clip=rl.clip)
        aux = {"pg_loss": pg, "clip_frac": losses.ppo_clip_fraction(logps_BN, mb["logps_BN"], mask_BN, clip=rl.clip),
               "approx_kl": losses.masked_mean(0.5 * (logps_BN - mb["logps_BN"]) ** 2, mask_BN)}
        total = pg
        if rl.method == "ppo":
            vl = losses.value_loss(values_BN, mb["values_BN"], mb["returns_BN"], mask_BN, clip=rl.value_clip)
            total = total + rl.vf_coef * vl
            aux["value_loss"] = vl
        elif rl.method == "grpo":
            kl = losses.masked_mean(losses.kl_penalty(logps_BN, mb["ref_logps_BN"], "k3"), mask_BN)
            total = total + kl_coef * kl
            aux["kl_loss"] = kl
        return total, aux

    def update(state: dict, exp: dict, kl: jax.Array) -> tuple[dict, dict]:
        with activation_mesh(mesh):
            B = exp["mask_BN"].shape[0]
            M = rl.minibatches
            step_key = jax.random.fold_in(base_key, state["step"])
            # Minibatch rows: a fresh permutation per epoch, from (seed, step, epoch).
            order = jnp.stack([jax.random.permutation(jax.random.fold_in(step_key, e), B) for e in range(rl.epochs)])
            order = order.reshape(rl.epochs * M, B // M)

            def body(carry, idx):
                params, opt_state = carry
                mb = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a[idx], rows_sharding(mesh, a.ndim)),
                                  exp)
                (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state["kl_coef"], mb)
                grad_norm = optax.tree.norm(grads)
                grads = clip_by_norm(grads, grad_norm, cfg.optim.clip_norm)
                updates, opt_state = tx.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), {"loss": loss, "grad_norm": grad_norm, **aux}

            (params, opt_state), per_update = jax.lax.scan(body, (state["params"], state["opt_state"]), order)
            metrics = jax.tree.map(jnp.mean, per_update)  # a NaN in any minibatch's update stays NaN
            metrics["nonfinite"] = nonfinite_flag(metrics["loss"], metrics["grad_norm"])
            kl_coef = state["kl_coef"]
            if rl.adaptive_kl:
                kl_coef = adapt_kl_coef(kl_coef, kl, B, rl.kl_target, rl.kl_horizon)
            metrics["lr"] = schedule(state["step"] * rl.epochs * M)  # the schedule counts optimiser updates
            new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "kl_coef": kl_coef}
            return new_state, {**metrics, "kl_coef": state["kl_coef"]}

    replicated = NamedSharding(mesh, P())
    return jax.jit(update, in_shardings=(shardings, None, replicated), out_shardings=(shardings, replicated),
                   donate_argnums=(0,))
