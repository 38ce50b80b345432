"""How good a policy is and how far it moved: the reward of its samples and its KL to a reference.

The KL is the sequence-level KL(policy || reference) on the policy's own samples, estimated by
the mean of log pi(y|x) - log pi_ref(y|x) over samples y ~ pi (unbiased; what the DPO paper's
reward-KL frontier plots and PPO's KL penalty bounds). A completion that ended by itself counts
its EOS; one cut at max_new_tokens does not.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from llm_jax.alignment.rewards import Scorer
from llm_jax.errors import UserError
from llm_jax.inference.api import Model


def evaluate_policy(policy: Model, reference: Model | None, prompts: Sequence[str], scorer: Scorer, *,
                    samples: int = 1, max_new_tokens: int = 32, temperature: float = 1.0,
                    seed: int = 0) -> dict[str, float]:
    """{reward, solved (share of samples scoring >= 1), kl (None without a reference), response_len}
    over `samples` draws of each prompt at `temperature`."""
    tok = policy.tokenizer
    if tok is None:
        raise UserError("evaluating a policy needs its tokenizer (prompts and rewards are text)")
    rows = [p for p in prompts for _ in range(samples)]
    prompt_ids = [tok.encode(p) for p in rows]
    completion_ids = policy.generate(prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    texts = [tok.decode(c) for c in completion_ids]
    rewards = np.asarray(scorer(rows, texts), np.float32)
    result = {"reward": float(rewards.mean()), "solved": float((rewards >= 1.0).mean()),
              "response_len": float(np.mean([len(c) for c in completion_ids])), "kl": None}
    if reference is not None:
        # generate stops a row at EOS without returning it: a row shorter than the limit ended there.
        scored = [c + [tok.eos_id] if len(c) < max_new_tokens else c for c in completion_ids]
        kl = policy.logprobs(prompt_ids, scored) - reference.logprobs(prompt_ids, scored)
        result["kl"] = float(kl.mean())
    return result
