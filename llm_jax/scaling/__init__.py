"""Scaling laws: fit results of training sweeps (Kaplan, Chinchilla), plot them and report them."""
