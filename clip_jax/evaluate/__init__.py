"""Evaluations of a trained model (`config.evals` entries, `clip-jax eval`); `suite.py` runs them."""

import logging

import ml_collections

log = logging.getLogger(__name__)
_told_skipped: set[str] = set()


def trained_on_shapes(config: ml_collections.ConfigDict, name: str) -> bool:
    """Whether the run trains on `shapes`, which the shapes evaluations score against. A run on other data (a user's
    run from configs/demo.py) is told once per entry that it is skipped: else its results table is empty unsaid."""
    if config.data.source == "shapes":
        return True
    if name not in _told_skipped:
        _told_skipped.add(name)
        log.warning("evals.%s: skipped, the run is not trained on shapes (drop the entry, or add an evaluation of "
                    "your own data: docs/methods.md, Evaluations)", name)
    return False
