"""CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023): a two-tower model trained with a contrastive loss
over the global batch (clip_jax/losses.py). The base of the image-text methods that keep CLIP's batch and towers."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import losses
from clip_jax.data.pipeline import Captions, ExampleKey, FieldHook, clip_captions
from clip_jax.methods.base import Field, Method, StepFns
from clip_jax.models import flops
from clip_jax.models.clip import CLIP, CLIPConfig
from clip_jax.models.towers import IMAGE_DROPOUT_FIELDS

log = logging.getLogger(__name__)

# The batch field of each example's key for the image tower's random drops: patch dropout, stochastic depth
# (uint32 [2]).
DROPOUT_KEY = "dropout_key"


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    label_smoothing: float = 0.0
    multi_positive: bool = False  # identical captions in a batch are positives of each other
    # A warm start (converted or stretched model, init_from) sets logit_scale to model.logit_scale_init instead of
    # keeping the checkpoint's value (Long-CLIP restarts from ln 100).
    reset_logit_scale: bool = False


class ClipMethod(Method):
    """Images and their captions; the symmetric InfoNCE loss with a learned temperature."""

    name = "clip"
    Config = ClipConfig
    image_dropout = True

    def model_config(self) -> CLIPConfig:
        return CLIPConfig.from_dict(self.config.model.to_dict())

    @property
    def drops_image_parts(self) -> bool:
        """Whether training images drop patch tokens or residual branches at random (`model.vision.patch_dropout`,
        `model.vision.stochastic_depth`; a ViT's fields): each example then carries a key of its own."""
        return any(self.config.model.vision.get(field, 0.0) > 0 for field in IMAGE_DROPOUT_FIELDS)

    def fields(self) -> dict[str, Field]:
        size = self.config.model.vision.image_size
        return {"image": Field((size, size, 3), np.uint8),
                **{name: Field((f.context_length,), np.int32) for name, f in self.captions().fields.items()},
                **({DROPOUT_KEY: Field((2,), np.uint32)} if self.drops_image_parts else {})}

    def field_hooks(self) -> tuple[FieldHook, ...]:
        """Under patch dropout or stochastic depth, each example's key for its draws (`ExampleKey`)."""
        return (ExampleKey(DROPOUT_KEY),) if self.drops_image_parts else ()

    def captions(self) -> Captions:
        return clip_captions(self.config)

    def model(self) -> CLIP:
        return CLIP(self.model_config())

    def init_inputs(self) -> tuple[np.ndarray, ...]:
        fields = self.fields()
        return tuple(np.zeros((1, *fields[k].shape), fields[k].dtype) for k in ("image", "text"))

    def loss_fn(self):
        """The local-shard loss (clip_jax/losses.py), with this method's hyperparameters bound."""
        h = self.hparams
        return lambda outputs, *, axis_name: losses.clip_loss(
            outputs, axis_name=axis_name, label_smoothing=h.label_smoothing, multi_positive=h.multi_positive)

    def step_fns(self, model: CLIP) -> StepFns:
        text_fields = tuple(self.captions().fields)
        drop = self.drops_image_parts

        def embed(params, batch, rng):
            del rng  # random only under patch dropout or stochastic depth, from each example's own key
            variables = {"params": params}
            image_options = {"dropout_rng": batch[DROPOUT_KEY]} if drop else {}
            out = {"image": model.apply(variables, batch["image"], method=CLIP.encode_image, **image_options)}
            for field in text_fields:
                out[field] = model.apply(variables, batch[field], method=CLIP.encode_text)
            return out

        def targets(batch):
            if not self.hparams.multi_positive:
                return {}
            # `caption_key` of `text`, `short_caption_key` of `short_text`: the rows with identical captions
            return {f"{f.removesuffix('text')}caption_key": losses.caption_key(batch[f]) for f in text_fields}

        def shared(params):
            scale, bias = model.apply({"params": params}, method=CLIP.temperature)
            return {"logit_scale": scale, "logit_bias": bias}

        # The bias too where the model learns one (SigLIP's): the two scalars set how sharp and how skewed the pairs'
        # logits can be, and a bias that never moves from its initial value shows here first.
        logged = ("logit_scale", "logit_bias") if model.config.logit_bias_init is not None else ("logit_scale",)
        return StepFns(embed=embed, shared=shared, loss=self.loss_fn(), targets=targets,
                       log=lambda s: {key: s[key] for key in logged})

    def warm_start(self, params, initial):
        if not self.hparams.reset_logit_scale:
            return params
        old = params["logit_scale"]
        scale = jnp.asarray(self.config.model.logit_scale_init, jnp.float32)
        return {**params, "logit_scale": jax.device_put(scale, getattr(old, "sharding", None))}

    def flops_per_example(self, trainable: Mapping[str, Any]) -> float:
        """A trained tower costs 3 forwards (forward, and backward to activations and to weights); a frozen one,
        which nothing trainable feeds, one."""
        cfg = self.model_config()
        text = sum(flops.text_forward_flops(cfg, f.context_length) for f in self.captions().fields.values())
        return (flops.pass_factor(trainable["visual"]) * flops.image_forward_flops(cfg, training=True)
                + flops.pass_factor(trainable["text"]) * text)


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    ring: bool = False  # the ring variant: text shards pass round the devices instead of being all-gathered
    multi_positive: bool = False
    reset_logit_scale: bool = False


class SiglipMethod(ClipMethod):
    """CLIP's towers and batch with the pairwise sigmoid loss; the model should set `model.logit_bias_init` (the
    paper's -10, as configs/siglip.py does) to learn the bias, else it is 0."""

    name = "siglip"
    Config = SiglipConfig

    def check(self, mesh) -> None:
        super().check(mesh)
        # It trains without one, but not as the paper does: that a bias was left out should not go unnoticed.
        if self.model_config().logit_bias_init is None:
            log.warning("method siglip without model.logit_bias_init: the sigmoid loss learns no bias (the paper "
                        "starts it at -10, about -ln of its batch; configs/siglip.py sets it)")

    def loss_fn(self):
        loss = losses.siglip_ring_loss if self.hparams.ring else losses.siglip_loss
        multi_positive = self.hparams.multi_positive
        return lambda outputs, *, axis_name: loss(outputs, axis_name=axis_name, multi_positive=multi_positive)
