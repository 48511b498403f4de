"""Evaluations of a trained model (`config.evals` entries, `clip-jax eval`); `suite.py` runs them."""

import logging

import ml_collections

log = logging.getLogger(__name__)
_told: set[str] = set()


def tell_once(message: str, level: int = logging.WARNING) -> None:
    """Logs `message` the first time only: a note on an evaluation entry, not repeated at every evaluation (each
    alpha of a WiSE-FT sweep, each eval during training)."""
    if message not in _told:
        _told.add(message)
        log.log(level, message)


def tell_skipped(name: str, reason: str) -> None:
    """Says once (`tell_once`) that `evals.<name>` is skipped, and why: else its figures are missing from the results
    unsaid."""
    tell_once(f"evals.{name}: skipped, {reason}")


def trained_on_shapes(config: ml_collections.ConfigDict, name: str) -> bool:
    """Whether the run trains on `shapes`, which the shapes evaluations score against; a run on other data (a user's
    run from configs/demo.py) is told that the entry is skipped."""
    if config.data.source == "shapes":
        return True
    tell_skipped(name, "the run is not trained on shapes (drop the entry, or add an evaluation of your own data: "
                 "docs/methods.md, Evaluations)")
    return False
