"""Placeholder until the fit lands."""

from pathlib import Path


def analyse(sweep_dir: Path, title: str) -> list[str]:
    return []
