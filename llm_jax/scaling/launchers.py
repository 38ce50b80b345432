"""Placeholder: cluster launchers."""


def submit_runs(launcher, runs, sweep_dir):
    raise NotImplementedError
