"""Scaling laws: sweeps over model sizes and compute budgets, and the fits of L(N, D)."""
