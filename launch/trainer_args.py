"""What the launchers (gpu.py, tpu.py) pass through to `clip-jax train`, checked as the trainer would: a sibling
module of plain Python, so a launcher runs where clip_jax is not installed (a laptop driving a TPU pod)."""

from __future__ import annotations

import argparse
import pathlib


def trainer_overrides(parser: argparse.ArgumentParser, rest: list[str], *, accepted: bool = True) -> list[str]:
    """The trainer's arguments among those `parser` left (`rest`): `--config.KEY=VALUE` overrides and `--debug`,
    passed through untouched as `clip-jax train` takes them. Anything else is a typo, and a `--config.KEY VALUE`
    would be two arguments to the trainer: `parser.error` for both, and for overrides the command does not take
    (`accepted` False)."""
    overrides = [a for a in rest if a.startswith("--config.") or a == "--debug"]
    unknown = [a for a in rest if a not in overrides]
    if spaced := next((a for a in overrides if a.startswith("--config.") and "=" not in a), None):
        parser.error(f"{spaced} needs its value after '=': {spaced}=VALUE")
    if unknown or (overrides and not accepted):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    return overrides


def check_recipe(command: str, config: str | None, overrides: list[str], root: pathlib.Path,
                 num_devices: int | None = None, workdir: str | None = None, fewer_devices: str = "") -> None:
    """The recipe, or without one the config.json of `workdir` where this machine sees it, read as the job will read
    it from `root`, and its mesh and batch checked against the job's `num_devices` where known
    (clip_jax.config.check_recipe: a bad file, override, mesh or batch exits here, not minutes later on every host);
    skipped where clip_jax is not installed beside the launcher, as the job's own start checks it then."""
    try:
        from clip_jax.config import check_recipe as check
    except ImportError:
        return
    check(command, config, overrides, root, num_devices, workdir, fewer_devices)
