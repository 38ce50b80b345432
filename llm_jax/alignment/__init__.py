"""Learning from preferences and rewards, on top of train and inference (docs/alignment.md)."""
