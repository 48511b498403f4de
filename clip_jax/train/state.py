"""Train state, the optimizer and the regex rules for which parameters train and which decay."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from clip_jax.errors import ConfigError
from clip_jax.sharding import match_any, param_paths

PyTree = Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: PyTree
    opt_state: PyTree
    rng: jax.Array  # for in-graph randomness of future methods (augmentations, masking); split every step


def trainable_mask(params: PyTree, frozen: Sequence[str]) -> PyTree:
    """True for parameters that train: those no `frozen` regex matches."""
    return jax.tree.map(lambda p: not match_any(frozen, p), param_paths(params))


def check_patterns(params: PyTree, patterns: Sequence[str], what: str) -> None:
    """A rule that matches no parameter is almost always a typo: say so instead of silently training everything."""
    paths = jax.tree.leaves(param_paths(params))
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{what} rule {pattern!r} is not a valid regex: {e}; fix it in --config.{what}") from None
        if not any(regex.search(p) for p in paths):
            example = next((p for p in paths if "/" in p), paths[0])  # a nested one shows the '/'-joined form
            raise ConfigError(f"{what} rule {pattern!r} matches no parameter{_closest_paths(pattern, paths)}; fix it "
                              f"in --config.{what} (regexes searched in '/'-joined paths, e.g. {example!r})")


def _closest_paths(pattern: str, paths: Sequence[str]) -> str:
    """" (did you mean '^text/positional_embedding$'?)" for a misspelt rule, or the nearest paths for a regex: an
    arbitrary parameter path says nothing of the typo. (config's did-you-mean compares whole keys; a rule names part
    of a path, between anchors that are kept around the corrected part.)"""
    start, core, end = re.fullmatch(r"(\^?)(.*?)(\$?)", pattern, re.DOTALL).groups()
    if re.escape(core) != core:  # a regex beyond anchors: compared with whole paths, and not rewritten
        close = difflib.get_close_matches(core.replace("\\", ""), paths, n=3, cutoff=0.5)
        return f" (the closest paths: {', '.join(map(repr, close))})" if close else ""
    # A literal: compared with the parts of paths it could name, as many '/'-separated names long, from the first
    # name if anchored by '^', to the last if by '$', a folder if it ends with '/' ('^vision/' -> '^visual/').
    names = core.split("/")
    folder = len(names) > 1 and names[-1] == ""
    n = len(names) - folder
    parts = set()
    for path in paths:
        segments = path.split("/")
        for i in range(len(segments) - n + 1):
            if (start and i) or (end and i + n != len(segments)) or (folder and i + n == len(segments)):
                continue
            parts.add("/".join(segments[i:i + n]) + "/" * folder)
    close = difflib.get_close_matches(core, sorted(parts), n=1, cutoff=0.5)
    return f" (did you mean {start + close[0] + end!r}?)" if close else ""


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0, then cosine decay to lr * min_lr_ratio at total_steps."""
    warmup = min(opt.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=opt.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=opt.lr * opt.min_lr_ratio,
    )


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int, params: PyTree) -> optax.GradientTransformation:
    """AdamW with clipping and warm-up + cosine; no decay where `opt.no_decay` matches (by default biases, norms'
    scales, embeddings and temperatures); frozen parameters get zero updates and no optimizer state at all."""
    check_patterns(params, opt.frozen, "optimizer.frozen")
    check_patterns(params, opt.no_decay, "optimizer.no_decay")
    paths = param_paths(params)
    decay_mask = jax.tree.map(lambda p: not match_any(opt.no_decay, p), paths)
    adamw = optax.chain(
        optax.clip_by_global_norm(opt.grad_clip_norm) if opt.grad_clip_norm > 0 else optax.identity(),
        optax.adamw(
            learning_rate_schedule(opt, total_steps),
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            mask=decay_mask,
        ),
    )
    if not opt.frozen:
        return adamw
    labels = jax.tree.map(lambda p: "frozen" if match_any(opt.frozen, p) else "train", paths)
    return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)


def init_state(params: PyTree, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)
