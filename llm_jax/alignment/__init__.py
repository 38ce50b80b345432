"""Learning from preferences and rewards on top of the trainer and the sampler: best-of-N, rewards
(reward models and verifiers), RL (PPO, GRPO, RLOO). Docs: docs/alignment.md."""
