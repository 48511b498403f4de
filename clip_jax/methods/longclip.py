"""Long-CLIP (Zhang et al. 2024, arXiv 2403.15378): fine-tunes a CLIP whose text positions were stretched
(`clip-jax stretch`, clip_jax/models/positions.py) on long captions, with primary component matching: the long
caption against the image features, and a short caption against the image features reduced to their top principal
components over the batch (`losses.longclip_loss`). docs/longclip.md has the recipe and the results."""

from __future__ import annotations

import dataclasses

from clip_jax import losses
from clip_jax.data.pipeline import Captions, TextField
from clip_jax.errors import ConfigError
from clip_jax.methods.clip import ClipMethod


def first_sentence(caption: str) -> str:
    """Long-CLIP's short caption of a long one: the text before the first ". " (the reference's split)."""
    return caption.split(". ")[0]


class ShortCaption:
    """The grain-side caption of `short_text`: the data's own short caption, else the long caption's first
    sentence. A class at module level, so grain's worker processes can pickle it."""

    def __call__(self, example: dict) -> dict[str, str]:
        short = example.get("short_caption", example.get("caption"))
        return {"short_caption": short if short is not None else first_sentence(example["long_caption"])}


@dataclasses.dataclass(frozen=True)
class LongClipConfig:
    label_smoothing: float = 0.1
    multi_positive: bool = False
    # long_weight * CLIP(image, long text) + short_weight * CLIP(PCA-reduced image, short text)
    long_weight: float = 1.0
    short_weight: float = 1.0
    pca_components: int = 32  # principal components kept; must be below the batch the PCA runs over
    pca_scope: str = "local"  # PCA over each device's batch (the reference) or the "global" all-gathered one
    # The short caption's token length (capped at the model's). The causal text tower gives the same features at
    # any length that holds the whole caption, so 77 tokens cost a third of 248 for nothing lost.
    short_context_length: int = 77
    reset_logit_scale: bool = False  # as in ClipConfig; the Long-CLIP recipes set it (ln 100)

    def __post_init__(self):
        if self.pca_scope not in ("local", "global"):
            raise ConfigError(f"method.pca_scope must be 'local' or 'global', got {self.pca_scope!r}")
        if self.pca_components < 1 or self.short_context_length < 2:
            raise ConfigError("method.pca_components must be >= 1 and method.short_context_length >= 2")


class LongClipMethod(ClipMethod):
    """CLIP's batch plus `short_text`, the short caption's tokens, embedded by the same text tower."""

    fine_tunes = True
    name = "longclip"
    Config = LongClipConfig

    def captions(self) -> Captions:
        context = self.config.model.text.context_length
        short = min(self.hparams.short_context_length, context)
        return Captions({"text": TextField("caption", context), "short_text": TextField("short_caption", short)},
                        add=ShortCaption())

    def loss_fn(self):
        h = self.hparams
        hparams = dict(label_smoothing=h.label_smoothing, multi_positive=h.multi_positive, long_weight=h.long_weight,
                       short_weight=h.short_weight, pca_components=h.pca_components, pca_scope=h.pca_scope)
        return lambda outputs, *, axis_name: losses.longclip_loss(outputs, axis_name=axis_name, **hparams)

    def check_batch_shards(self, shards: int) -> None:  # (check_devices calls it, in the trainer and the launchers)
        h, batch_size = self.hparams, self.config.batch_size
        pca_batch = batch_size // (shards if h.pca_scope == "local" else 1)
        if pca_batch - 1 <= h.pca_components:  # a centred batch of B rows has rank B - 1: B - 1 components rebuild it
            raise ConfigError(
                f"method.pca_components {h.pca_components} must be below the {h.pca_scope} batch the PCA runs over "
                f"minus one ({pca_batch}: batch_size {batch_size}, {shards} batch shards), else the short-caption "
                "term sees the fine features; lower method.pca_components or raise batch_size"
                # global runs over the whole batch: a remedy only where the batch is split
                + (" or set method.pca_scope='global'" if h.pca_scope == "local" and shards > 1 else "")
            )
