"""Alignment on top of train + inference: RL from a reward (PPO, GRPO, RLOO)."""
