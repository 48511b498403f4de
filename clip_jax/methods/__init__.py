"""The methods of the CLIP family, by the name `config.method.name` gives (see base.py for what a method is, and
docs/methods.md for how to add one)."""

from __future__ import annotations

import ml_collections

from clip_jax.errors import ConfigError
from clip_jax.methods.audioclip import AudioClipMethod
from clip_jax.methods.base import Method
from clip_jax.methods.clip import ClipMethod, SiglipMethod
from clip_jax.methods.few_shot import FEW_SHOT_METHODS
from clip_jax.methods.glip import GLIPMethod
from clip_jax.methods.groupvit import GroupViTMethod
from clip_jax.methods.longclip import LongClipMethod
from clip_jax.methods.lseg import LSegMethod
from clip_jax.methods.negclip import NegClipMethod
from clip_jax.methods.prompt_learning import PROMPT_LEARNING_METHODS
from clip_jax.methods.slip import SlipMethod
from clip_jax.methods.vild import ViLDMethod
from clip_jax.methods.wise_ft import WiseFtMethod


def registry(methods: tuple[type[Method], ...]) -> dict[str, type[Method]]:
    """{name: class} of `methods`; RuntimeError where two share a name (a subclass that forgets its own `name`
    inherits its parent's, and would replace it without a word)."""
    table = {m.name: m for m in methods}
    if len(table) != len(methods):
        shared = sorted({m.name for m in methods if sum(n.name == m.name for n in methods) > 1})
        raise RuntimeError(f"registered methods share the name {', '.join(shared)}: give each its own `name`")
    return table


METHODS: dict[str, type[Method]] = registry((
    ClipMethod, SiglipMethod, NegClipMethod, LongClipMethod, SlipMethod, AudioClipMethod, *FEW_SHOT_METHODS,
    *PROMPT_LEARNING_METHODS, WiseFtMethod, LSegMethod, GroupViTMethod, ViLDMethod, GLIPMethod))


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"unknown method.name {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def get_method(config: ml_collections.ConfigDict) -> Method:
    """The method `config.method` describes, with its hyperparameters."""
    return method_class(config.method.name)(config)
