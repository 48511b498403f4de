"""GroupViT (Xu et al., CVPR 2022): segments that emerge from image-text training alone.

The image tower is models/grouping.py's `GroupVisionTransformer`: stages of blocks separated by grouping blocks that
assign every token to a group (hard Gumbel-softmax with straight-through in training, soft at evaluation). Its
embedding is the mean of the final segment tokens, trained with CLIP's loss against the captions plus, weighted by
`multi_label_weight`, the multi-label contrastive loss (losses.multi_label_loss) against K per-object phrases per
image ("a photo of the red circle.": on `shapes` the scene names its objects, the phrases the reference extracts
from captions with NLTK's noun tags), at a temperature of its own.

Zero-shot segmentation (`dense_logits`): the stages' soft assignments multiplied map each patch to a final segment,
upsampled bilinearly to the pixels, each pixel taking its most likely segment (one-hot, as the reference); each
segment's embedding (its token through the projection) is scored against the label embeddings, only among the
image's `top_k_classes` best classes (by the whole-image embedding), and the pixel gets its segment's class
probabilities. The background is every pixel whose best probability is below a threshold, which the evaluation
chooses on `val` (evaluate/segmentation.py, background "threshold").

Differences from the reference, on purpose: the projections are CLIP's linear ones where the reference has 2-layer
MLPs with BatchNorm (the towers come from a CLIP: its text tower and, for stage 1, its image tower's first blocks
via `vit_to_groupvit_params`); stage sizes fit the tiny model (METHODS.md 9.5: 16 and 8 groups, not 64 and 8).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from clip_jax import losses
from clip_jax.data.pipeline import Captions, ExampleKey, FieldHook, TextField, clip_captions
from clip_jax.data.shapes import ZERO_SHOT_TEMPLATES
from clip_jax.errors import ConfigError
from clip_jax.methods.base import Field, StepFns
from clip_jax.methods.clip import ClipConfig, ClipMethod
from clip_jax.models import flops
from clip_jax.models.clip import CLIP, l2_normalize
from clip_jax.models.grouping import (
    GroupVisionTransformer,
    assignment_to_pixels,
    check_stages,
    segment_assignment,
    vit_to_groupvit_params,
)
from clip_jax.models.layers import TowerOutput


@dataclasses.dataclass(frozen=True)
class GroupViTConfig(ClipConfig):
    stage_depths: tuple = (2, 1, 1)  # blocks per stage; they sum to model.vision.layers
    num_group_tokens: tuple = (16, 8, 0)  # group tokens per stage (the last stage has none)
    num_output_groups: tuple = (16, 8)  # segments out of each grouping block
    hard: bool = True  # one-hot assignments in training (straight-through)
    tau: float = 1.0  # the Gumbel-softmax temperature
    eval_hard: bool = False  # evaluation with one-hot assignments (the paper), not soft ones (the code)
    multi_label_weight: float = 1.0  # 0: CLIP's image-text loss alone
    prompts: int = 3  # K: per-object phrases per image, padded with the caption when the scene has fewer objects
    prompt_templates: tuple = ZERO_SHOT_TEMPLATES
    multi_label_scale_init: float = math.log(1 / 0.07)
    top_k_classes: int = 5  # zero-shot segmentation among the image's k best classes (0: all)
    init_stage1: bool = True  # a warm start copies the CLIP image tower's first blocks into stage 1


class GroupViTCLIP(CLIP):
    """CLIP with a GroupViT image tower (`visual`) and the multi-label loss's temperature (`multi_label_scale`)."""

    hparams: GroupViTConfig = GroupViTConfig()

    def setup(self):
        super().setup()
        init = nn.initializers.constant(self.hparams.multi_label_scale_init)
        self.multi_label_scale = self.param("multi_label_scale", init, (), jnp.float32)

    def vision_tower(self, common: dict[str, Any]) -> nn.Module:
        h = self.hparams
        return GroupVisionTransformer(self.config.vision, stage_depths=tuple(h.stage_depths),
                                      num_group_tokens=tuple(h.num_group_tokens),
                                      num_output_groups=tuple(h.num_output_groups), hard=h.hard, tau=h.tau,
                                      eval_hard=h.eval_hard, **common)

    def image_features(self, images: jax.Array, **prompts) -> TowerOutput:
        """The evaluation forward: soft assignments, no noise."""
        if any(v is not None for v in prompts.values()):
            raise ValueError("a GroupViT image tower takes no deep prompts")
        return self.visual(self.normalize(images), train=False)[0]

    def train_image_embedding(self, images: jax.Array, rng: jax.Array) -> jax.Array:
        """The training forward (Gumbel noise from `rng`, one key per example [B, 2]; hard assignments):
        L2-normalised [B, D]."""
        return l2_normalize(self.visual(self.normalize(images), train=True, rng=rng)[0].pooled)

    def segments(self, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(image embedding [B, D], segment embeddings [B, G, D], both L2-normalised, and the patch-to-segment
        assignment [B, G, N]) of the evaluation forward."""
        out, assignments = self.visual(self.normalize(images), train=False)
        proj = self.visual.variables["params"]["proj"]
        return (l2_normalize(out.pooled), l2_normalize(out.tokens @ proj.astype(out.tokens.dtype)),
                segment_assignment(assignments))

    def dense_logits(self, images: jax.Array, labels: jax.Array) -> jax.Array:
        """Log-probabilities [B, S, S, L] of each pixel's label (module docstring)."""
        image, segments, assignment = self.segments(images)
        cfg, labels = self.config.vision, labels.astype(jnp.float32)
        scale, _ = self.temperature()
        logits = scale * segments @ labels.T  # [B, G, L]
        k = self.hparams.top_k_classes
        if 0 < k < labels.shape[0]:
            image_logits = image @ labels.T
            kth = jax.lax.top_k(image_logits, k)[0][:, -1:]
            logits = jnp.where((image_logits >= kth)[:, None, :], logits, -jnp.inf)
        pixels = assignment_to_pixels(assignment, cfg.grid, cfg.image_size)  # [B, G, S, S]
        owner = jax.nn.one_hot(jnp.argmax(pixels, axis=1), pixels.shape[1], dtype=jnp.float32)  # [B, S, S, G]
        probs = jnp.einsum("bhwg,bgl->bhwl", owner, jax.nn.softmax(logits, axis=-1))
        return jnp.log(jnp.maximum(probs, 1e-30))

    def multi_label_temperature(self) -> jax.Array:
        return self.clamped_scale(self.multi_label_scale)

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
        return {**super().__call__(images, tokens), "multi_label_scale": self.multi_label_temperature()}


@dataclasses.dataclass(frozen=True)
class ObjectPhrases:
    """The pipeline's caption hook (`Captions.add`): `prompt_0`..`prompt_{K-1}`, one phrase per object of a shapes
    scene in the scene's order (the salient object first, the others in random order), each in a template picked by
    the object's grid cell; the example's long caption where the scene has fewer than K objects (the reference pads
    with the caption). Picklable for grain's workers."""

    prompts: int
    templates: tuple[str, ...]

    def __call__(self, example: dict) -> dict[str, str]:
        objects = example["scene"].objects
        out = {}
        for k in range(self.prompts):
            if k < len(objects):
                obj = objects[k]
                out[f"prompt_{k}"] = self.templates[obj.cell % len(self.templates)].format(f"{obj.colour} {obj.shape}")
            else:
                out[f"prompt_{k}"] = example["long_caption"]
        return out


def _prompt_fields(k: int) -> tuple[str, ...]:
    return tuple(f"prompt_{i}" for i in range(k))


class GroupViTMethod(ClipMethod):
    """CLIP's batch plus K per-object phrases; CLIP's loss plus the weighted multi-label loss."""

    name = "groupvit"
    segment_background = "threshold"
    export_leaves = ("GroupViT's image tower has", "clip-jax segment, encode")
    exports_image_tower = False
    Config = GroupViTConfig
    image_dropout = False  # its grouping stages assign every patch to a segment; its tower has its own blocks

    def __init__(self, config):
        super().__init__(config)
        h, v = self.hparams, config.model.vision
        if v.get("type", "vit") != "vit":
            raise ConfigError("method groupvit builds its own image tower from model.vision's ViT fields (width, "
                              f"layers, heads, patch_size); set model.vision.type 'vit', not {v.type!r}")
        if v.get("pool", "token") != "token":  # its image feature is the mean of its last segment tokens
            raise ConfigError(f"method groupvit pools its own segment tokens, so model.vision.pool {v.pool!r} would "
                              "do nothing; leave it 'token'")
        try:
            check_stages(v.layers, tuple(h.stage_depths), tuple(h.num_group_tokens), tuple(h.num_output_groups))
        except ValueError as e:
            raise ConfigError(f"method groupvit: {e}") from None
        if h.multi_label_weight < 0 or h.prompts < 1:
            raise ConfigError(f"method.multi_label_weight must be >= 0 and method.prompts >= 1, got "
                              f"{h.multi_label_weight} and {h.prompts}")
        if h.multi_label_weight and config.data.source != "shapes":
            raise ConfigError(f"method groupvit's multi-label loss needs per-object phrases, which data.source "
                              f"'shapes' has and {config.data.source!r} has not; set method.multi_label_weight 0")

    def captions(self) -> Captions:
        base = clip_captions(self.config)
        if not self.hparams.multi_label_weight:
            return base
        length = self.config.model.text.context_length
        fields = {**base.fields, **{f: TextField(f, length) for f in _prompt_fields(self.hparams.prompts)}}
        return Captions(fields, add=ObjectPhrases(self.hparams.prompts, tuple(self.hparams.prompt_templates)))

    def fields(self) -> dict[str, Field]:
        return {**super().fields(), "noise_key": Field((2,), np.uint32)}

    def field_hooks(self) -> tuple[FieldHook, ...]:
        return (ExampleKey("noise_key"),)  # not CLIP's: no patch dropout

    def model(self) -> GroupViTCLIP:
        return GroupViTCLIP(self.model_config(), self.hparams)

    def loss_fn(self):
        h, clip = self.hparams, super().loss_fn()
        if not h.multi_label_weight:
            return clip

        def loss(outputs, *, axis_name):
            clip_loss, metrics = clip(outputs, axis_name=axis_name)
            ml_loss, _ = losses.multi_label_loss(outputs, axis_name=axis_name, multi_positive=h.multi_positive)
            return clip_loss + h.multi_label_weight * ml_loss, {**metrics, "loss_clip": clip_loss,
                                                                 "loss_multi_label": ml_loss}

        return loss

    def step_fns(self, model: GroupViTCLIP) -> StepFns:
        fns = super().step_fns(model)
        prompts = _prompt_fields(self.hparams.prompts) if self.hparams.multi_label_weight else ()

        def embed(params, batch, rng):
            variables = {"params": params}
            del rng  # each example's noise comes from its own key (`ExampleKey`), whatever the batch's layout
            image = model.apply(variables, batch["image"], batch["noise_key"],
                                method=GroupViTCLIP.train_image_embedding)
            out = {"image": image,
                   "text": model.apply(variables, batch["text"], method=CLIP.encode_text)}
            if prompts:
                out["prompts"] = jnp.stack([model.apply(variables, batch[f], method=CLIP.encode_text)
                                            for f in prompts], axis=1)
            return out

        def targets(batch):
            out = {k: v for k, v in fns.targets(batch).items() if not k.startswith("prompt_")}
            if prompts and self.hparams.multi_positive:
                out["prompt_key"] = jnp.stack([losses.caption_key(batch[f]) for f in prompts], axis=1)
            return out

        def shared(params):
            scale = model.apply({"params": params}, method=GroupViTCLIP.multi_label_temperature)
            return {**fns.shared(params), "multi_label_scale": scale}

        return dataclasses.replace(fns, embed=embed, targets=targets, shared=shared,
                                   log=lambda s: {k: s[k] for k in ("logit_scale", "multi_label_scale")})

    # --- warm start from a CLIP -----------------------------------------------------------------------------------
    def base_params(self, params):
        """A warm start reads a CLIP: its text tower and temperature, and (`init_stage1`) its ViT image tower, whose
        first blocks `warm_start` copies into stage 1. The ViT's parameters are described replicated (the
        conversion is on the host side of the tower)."""
        read = {k: params[k] for k in ("text", "logit_scale")}
        if self.hparams.init_stage1:
            mesh = jax.tree.leaves(params)[0].sharding.mesh
            plain = CLIP(self.model_config())
            vit = jax.eval_shape(plain.init, jax.random.PRNGKey(0), *self.init_inputs())["params"]["visual"]
            replicated = NamedSharding(mesh, PartitionSpec())
            read["visual"] = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                                          nn.meta.unbox(vit))
        return read

    def warm_start(self, restored, initial):
        out = {**initial, **{k: restored[k] for k in ("text", "logit_scale")}}
        if self.hparams.init_stage1:
            visual = vit_to_groupvit_params(restored["visual"], initial["visual"], self.hparams.stage_depths[0])
            out["visual"] = jax.tree.map(lambda a, ref: jax.device_put(jnp.asarray(a, ref.dtype), ref.sharding),
                                         visual, initial["visual"])
        return super().warm_start(out, initial)

    def flops_per_example(self, trainable: Mapping[str, Any]) -> float:
        """The GroupViT tower (`flops.groupvit_forward_flops`) and CLIP's text tower over the caption and the K
        phrases."""
        cfg, h = self.model_config(), self.hparams
        image = flops.groupvit_forward_flops(cfg, tuple(h.stage_depths), tuple(h.num_group_tokens),
                                             tuple(h.num_output_groups))
        text = sum(flops.text_forward_flops(cfg, f.context_length) for f in self.captions().fields.values())
        return flops.pass_factor(trainable["visual"]) * image + flops.pass_factor(trainable["text"]) * text
