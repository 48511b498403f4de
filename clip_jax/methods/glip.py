"""GLIP (Li et al., CVPR 2022): detection as phrase grounding.

Each training image comes with a prompt: the names of the classes present and of random other base classes,
shuffled, joined by ". " (GLIP's detection-as-grounding prompts, its Objects365 recipe; on `shapes` the scene's
objects are the phrases with their boxes, gold grounding). The detector (models/detection.py::GLIPCLIP) aligns every
patch with every token of the prompt after `fusion_layers` of deep fusion (0: GLIP-T (A), no fusion), and is trained
with the sigmoid focal loss on the patch x phrase matrix (positive: the patch the object is assigned to and the
phrase naming it) plus L1 + GIoU on the patch's box.

The text tower is CLIP's, causal where GLIP's BERT reads both ways: a word's feature has seen only the words before
it, so the first word of "red circle" cannot know which shape is meant. A phrase is therefore scored by its last
token only, whose feature has read the whole phrase (METHODS.md 12.6's option), and the other tokens take no part
in the loss; the fusion layers let every word read the image but not the words after it. At test, the class names
are packed into as few prompts as fit the context (GLIP's LVIS chunks), one forward per prompt.

The text tower is frozen by default (`FROZEN`): GLIP fine-tunes its BERT at a tenth of the learning rate, which one
optimizer with one learning rate cannot say; a frozen tower keeps the novel names' features where the CLIP put them.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from clip_jax import losses
from clip_jax.data.detection import DetectionSet, grounding_prompt, prompt_chunks
from clip_jax.errors import ConfigError
from clip_jax.methods.base import Field, Preparation, StepFns
from clip_jax.methods.detection import DetectionConfig, DetectionMethod
from clip_jax.models.detection import GLIPCLIP

FROZEN = (r"^text/", r"^logit_scale$")


@dataclasses.dataclass(frozen=True)
class GLIPConfig(DetectionConfig):
    fusion_layers: int = 1  # deep fusion: bidirectional cross-attention layers (0: none)
    fusion_heads: int = 4
    prompt_classes: int = 6  # phrases per training prompt: the image's classes, then random negatives
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


class GLIPMethod(DetectionMethod):
    name = "glip"
    Config = GLIPConfig
    export_leaves = ("the glip detector's heads have", "clip-jax detect")

    def __init__(self, config):
        super().__init__(config)
        if self.hparams.prompt_classes < 1 or self.hparams.fusion_layers < 0:
            raise ConfigError(f"method glip needs prompt_classes >= 1 and fusion_layers >= 0, got "
                              f"{self.hparams.prompt_classes}, {self.hparams.fusion_layers}")

    model_fields = (*DetectionMethod.model_fields, "fusion_layers", "fusion_heads", "focal_alpha", "focal_gamma")

    def extra_fields(self) -> dict[str, Field]:
        k = self.hparams.prompt_classes
        return {"prompt": Field((self.config.model.text.context_length,), np.int32),
                "phrase_ends": Field((k,), np.int32), "phrase_classes": Field((k,), np.int32)}

    def extra_arrays(self, prep: Preparation, data: DetectionSet) -> dict[str, np.ndarray]:
        k, length = self.hparams.prompt_classes, self.config.model.text.context_length
        names = data.names
        base = np.flatnonzero(self.base_mask(names))
        prompts = np.zeros((len(data), length), np.int32)
        ends = np.zeros((len(data), k), np.int32)
        phrase_classes = np.full((len(data), k), -1, np.int32)
        for name in names:  # a name that no prompt can hold: fewer classes a prompt would not help
            try:
                grounding_prompt(prep.tokenizer, [name], length)
            except ValueError as e:
                raise ConfigError(f"method glip: the category {name!r} cannot be a phrase of a prompt ({e}); rename it "
                                  "in the annotations") from None
        for i, present in enumerate(data.classes):
            rng = np.random.default_rng([self.config.seed, i])
            present = list(dict.fromkeys(int(c) for c in present))[:k]  # a scene names a class once
            negatives = rng.permutation(np.setdiff1d(base, present))[: k - len(present)]
            chosen = rng.permutation(np.asarray(present + [int(c) for c in negatives], np.int32))
            try:
                prompts[i], chunk_ends = grounding_prompt(prep.tokenizer, [names[c] for c in chosen], length)
            except ValueError as e:
                raise ConfigError(f"method glip: a training prompt does not fit ({e}); lower method.prompt_classes"
                                  ) from None
            ends[i, : len(chosen)] = chunk_ends
            phrase_classes[i, : len(chosen)] = chosen
        return {"prompt": prompts, "phrase_ends": ends, "phrase_classes": phrase_classes}

    def model(self) -> GLIPCLIP:
        h = self.hparams
        return GLIPCLIP(self.model_config(), box_width=h.box_width, fusion_layers=h.fusion_layers,
                        fusion_heads=h.fusion_heads)

    def detection_queries(self, texts, tokenizer, names):
        tokens, ends, classes = prompt_chunks(tokenizer, names, self.config.model.text.context_length)
        onehot = (classes[..., None] == np.arange(len(names))).astype(np.float32)  # -1 matches no class
        return tokens, ends, onehot

    def text_passes(self) -> int:
        return 1

    def step_fns(self, model: GLIPCLIP) -> StepFns:
        h = self.hparams

        def forward(m: GLIPCLIP, images, prompt):
            return m.align(m.visual_features(images), prompt)

        def embed(params, batch, rng):
            del rng
            logits, boxes = model.apply({"params": params}, batch["image"], batch["prompt"], method=forward)
            at_ends = jnp.take_along_axis(logits, batch["phrase_ends"][:, None, :], axis=2)  # [B, P, K]
            return {"patch_logits": at_ends, "patch_boxes": boxes}

        def targets(batch):
            slots = batch["phrase_classes"][:, None, :]  # [B, 1, K]
            valid = jnp.broadcast_to(slots >= 0, (*batch["patch_classes"].shape, slots.shape[-1]))
            return {"patch_targets": (batch["patch_classes"][..., None] == slots) & valid, "patch_valid": valid,
                    "assigned": batch["patch_classes"] >= 0, "target_boxes": batch["patch_boxes"]}

        def loss(outputs, *, axis_name):
            return losses.detection_loss(outputs, axis_name=axis_name, l1_weight=h.l1_weight,
                                         giou_weight=h.giou_weight, focal_alpha=h.focal_alpha,
                                         focal_gamma=h.focal_gamma)

        return StepFns(embed=embed, shared=lambda params: {}, loss=loss, targets=targets)
