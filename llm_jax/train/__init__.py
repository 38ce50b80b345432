"""Train state, optimiser, the jitted step and the loop."""
