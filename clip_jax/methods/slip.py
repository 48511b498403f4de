"""SLIP (Mu et al., ECCV 2022): CLIP plus SimCLR on the same image tower.

Each example brings two augmented views of its image besides CLIP's (`ssl_views`, made in the input pipeline by
data/augment.py: the reference's SimCLR set or a colour-preserving one). Both views go through the image tower; an
MLP head (`ssl_head`) maps their feature before the projection (`TowerOutput.feature`) to an L2-normalised
embedding, and NT-Xent over the global batch (losses.nt_xent_loss) scores each view against the other. The loss is
CLIP's + `ssl_scale` x NT-Xent. A step costs three image-tower passes where CLIP's costs one.

The head's normalisation is LayerNorm where the reference has SyncBatchNorm: per example, so that a step does not
depend on how the batch is split over devices and micro-batches (SLIP#7: small per-GPU batches with the reference's
BatchNorm train to chance). The head is dropped at export (it has no place in the OpenAI / HF layouts).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from clip_jax import losses
from clip_jax.data.augment import SSL_AUGMENTATIONS, SslViews
from clip_jax.data.pipeline import FieldHook
from clip_jax.errors import ConfigError
from clip_jax.methods.base import Field, StepFns
from clip_jax.methods.clip import ClipConfig, ClipMethod
from clip_jax.models import flops
from clip_jax.models.clip import CLIP, l2_normalize
from clip_jax.models.layers import LayerNorm, dense


@dataclasses.dataclass(frozen=True)
class SlipConfig(ClipConfig):
    ssl_scale: float = 1.0  # weight of NT-Xent beside the CLIP loss
    ssl_temperature: float = 0.1
    ssl_hidden: int = 4096  # the head: feature -> hidden -> hidden -> ssl_dim
    ssl_dim: int = 256
    augmentation: str = "simclr"  # "simclr" (the reference's) or "colour" (colour-preserving): data/augment.py

    def __post_init__(self):
        # A head of no width fails at init, a temperature <= 0 makes NaN or inverted steps, a negative weight
        # maximises NT-Xent: one line each, when the config is read.
        for field, what in (("ssl_hidden", "the head's hidden width"), ("ssl_dim", "the head's output width")):
            if getattr(self, field) < 1:
                raise ConfigError(f"method.{field} must be >= 1 ({what}), got {getattr(self, field)}")
        if not self.ssl_temperature > 0:
            raise ConfigError(f"method.ssl_temperature must be > 0 (NT-Xent divides the similarities by it), got "
                              f"{self.ssl_temperature}: the paper's is 0.1")
        if not self.ssl_scale >= 0:
            raise ConfigError(f"method.ssl_scale must be >= 0 (the weight of NT-Xent beside CLIP's loss), got "
                              f"{self.ssl_scale}: the paper's is 1.0")


class SslHead(nn.Module):
    """Linear - LayerNorm - ReLU - Linear - LayerNorm - ReLU - Linear (the reference's 3-layer MLP)."""

    hidden: int
    out_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(LayerNorm(name="ln_1")(dense(self.hidden, ("embed", "mlp"), "fc_1")(x)))
        x = nn.relu(LayerNorm(name="ln_2")(dense(self.hidden, ("mlp", None), "fc_2")(x)))
        return dense(self.out_dim, (None, "proj"), "fc_3")(x)


class SlipCLIP(CLIP):
    """CLIP with the self-supervised head beside the towers: parameters `visual`, `text`, `logit_scale` as in CLIP,
    and `ssl_head/...`."""

    ssl_head: nn.Module | None = None

    def ssl_embeddings(self, images: jax.Array) -> jax.Array:
        """L2-normalised head outputs [B, ssl_dim] of uint8 images."""
        return l2_normalize(self.ssl_head(self.image_features(images).feature))

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
        return {**super().__call__(images, tokens), "ssl": self.ssl_embeddings(images)}  # (init creates the head)


class SlipMethod(ClipMethod):
    """CLIP's batch plus two augmented views per image; CLIP's loss plus ssl_scale x NT-Xent (module docstring)."""

    name = "slip"
    Config = SlipConfig
    export_leaves = ("SLIP's self-supervised head has", "only training uses it")

    def __init__(self, config):
        super().__init__(config)
        if self.hparams.augmentation not in SSL_AUGMENTATIONS:
            raise ConfigError(f"unknown method.augmentation {self.hparams.augmentation!r}; choose one of "
                              f"{', '.join(SSL_AUGMENTATIONS)}")

    def fields(self) -> dict[str, Field]:
        size = self.config.model.vision.image_size
        return {**super().fields(), "ssl_views": Field((2, size, size, 3), np.uint8)}

    def model(self) -> SlipCLIP:
        return SlipCLIP(self.model_config(), SslHead(self.hparams.ssl_hidden, self.hparams.ssl_dim))

    def field_hooks(self) -> tuple[FieldHook, ...]:
        return (SslViews(self.config.model.vision.image_size, self.hparams.augmentation), *super().field_hooks())

    def loss_fn(self):
        h, clip = self.hparams, super().loss_fn()

        def loss(outputs, *, axis_name):
            clip_loss, metrics = clip(outputs, axis_name=axis_name)
            ssl_loss, ssl_metrics = losses.nt_xent_loss(outputs, axis_name=axis_name, temperature=h.ssl_temperature)
            return clip_loss + h.ssl_scale * ssl_loss, {**metrics, **ssl_metrics, "loss_clip": clip_loss,
                                                        "loss_ssl": ssl_loss}

        return loss

    def step_fns(self, model: SlipCLIP) -> StepFns:
        fns = super().step_fns(model)

        def embed(params, batch, rng):
            out = fns.embed(params, batch, rng)
            views = batch["ssl_views"]
            flat = views.reshape(views.shape[0] * 2, *views.shape[2:])  # rows 2i, 2i + 1: example i's views
            ssl = model.apply({"params": params}, flat, method=SlipCLIP.ssl_embeddings)
            ssl = ssl.reshape(views.shape[0], 2, -1)
            return {**out, "ssl_1": ssl[:, 0], "ssl_2": ssl[:, 1]}

        return dataclasses.replace(fns, embed=embed)

    def base_params(self, params):
        """A warm start (init_from a CLIP run or a converted model) reads CLIP's parameters; the head starts anew."""
        return {k: v for k, v in params.items() if k != "ssl_head"}

    def warm_start(self, restored, initial):
        return {**super().warm_start(restored, initial), "ssl_head": initial["ssl_head"]}

    def flops_per_example(self, trainable: Mapping[str, Any]) -> float:
        """CLIP's, plus the two views through the image tower and the head."""
        cfg, h = self.model_config(), self.hparams
        head = 2 * (cfg.vision.feature_width * h.ssl_hidden + h.ssl_hidden * h.ssl_hidden + h.ssl_hidden * h.ssl_dim)
        return (super().flops_per_example(trainable)
                + 2 * flops.pass_factor(trainable["visual"]) * flops.image_forward_flops(cfg)
                + 2 * flops.pass_factor(trainable["ssl_head"]) * head)

