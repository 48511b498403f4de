"""NegCLIP's loss (Yuksekgonul et al., ICLR 2023, "When and why vision-language models behave like
bags-of-words"): CLIP with a hard negative caption per example, added to the batch's texts, so that every image is
scored against every negative in the image-to-text term (losses.clip_loss, `negative_key`).

The paper's negatives swap words within a caption (two nouns, two adjectives: the same words bound otherwise) and it
fine-tunes a pretrained CLIP on COCO with them. Here the negatives come from a caption file's column
(`data.negative_captions` with `data.source` "captions": `data.negative_caption_field`, e.g. swapped captions; one
or a list per row, of which each example draws one, as the paper's own COCO TSV has them), the
same key of ArrayRecord records' metadata (`data.source` "records": a table converted with that column), or from
the shapes source (data/shapes.py's `negative_captions`): each caption with its salient object's colour or shape
replaced by another training pair's (SugarCrepe's "replace" kind; a short caption names one object and has nothing
to swap). A step costs a second text-tower pass. docs/demo.md (the twenty-first round) has what it did on
shapes, and the `shapes_binding` evaluation both kinds of test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from clip_jax import losses
from clip_jax.data.pipeline import NEGATIVE_CAPTION, Captions, TextField
from clip_jax.errors import ConfigError
from clip_jax.methods.base import StepFns
from clip_jax.methods.clip import ClipConfig, ClipMethod
from clip_jax.models import flops
from clip_jax.models.clip import CLIP

NEGATIVE_TEXT = "negative_text"  # the batch field of the negative captions' tokens


@dataclasses.dataclass(frozen=True)
class NegClipConfig(ClipConfig):
    # Whether the negatives' gradient trains the text tower (the paper's). False: only the image tower learns from
    # them (to score its caption above them), and their text pass costs a forward instead of three.
    negative_text_grad: bool = True


class NegClipMethod(ClipMethod):
    """CLIP's batch plus each example's hard negative caption, an extra candidate of every image."""

    name = "negclip"
    Config = NegClipConfig

    def __init__(self, config):
        super().__init__(config)
        if config.data.source not in ("shapes", "captions", "records") or not config.data.negative_captions:
            raise ConfigError("method negclip trains on negative captions, the shapes source's, a caption file's or "
                              "ArrayRecord shards': set data.source 'shapes', 'captions' or 'records' and "
                              f"data.negative_captions True (got {config.data.source!r}, "
                              f"{config.data.negative_captions})")
        if config.data.source != "shapes" and not config.data.negative_caption_field:
            raise ConfigError("data.negative_caption_field must name the column (records: the metadata key) of the "
                              "negative captions")

    def captions(self) -> Captions:
        context = self.config.model.text.context_length
        return Captions({**super().captions().fields, NEGATIVE_TEXT: TextField(NEGATIVE_CAPTION, context)})

    def loss_fn(self):
        h = self.hparams
        return lambda outputs, *, axis_name: losses.clip_loss(
            outputs, axis_name=axis_name, label_smoothing=h.label_smoothing, multi_positive=h.multi_positive,
            negative_key=NEGATIVE_TEXT)

    def step_fns(self, model: CLIP) -> StepFns:
        fns = super().step_fns(model)

        def targets(batch):
            # The keys mark a negative identical to an image's caption (a long caption cut before the replaced word)
            return {"caption_key": losses.caption_key(batch["text"]),
                    "negative_caption_key": losses.caption_key(batch[NEGATIVE_TEXT])}

        if self.hparams.negative_text_grad:
            return dataclasses.replace(fns, targets=targets)

        def embed(params, batch, rng):
            # No gradient reaches the negatives' pass, so the compiler drops its backward
            out = fns.embed(params, batch, rng)
            return {**out, NEGATIVE_TEXT: jax.lax.stop_gradient(out[NEGATIVE_TEXT])}

        return dataclasses.replace(fns, embed=embed, targets=targets)

    def flops_per_example(self, trainable: Mapping[str, Any]) -> float:
        """CLIP's count with the negatives as a caption field; without their gradient, their pass is one forward."""
        total = super().flops_per_example(trainable)
        if self.hparams.negative_text_grad:
            return total
        negatives = flops.text_forward_flops(self.model_config(), self.config.model.text.context_length)
        return total - (flops.pass_factor(trainable["text"]) - 1) * negatives
