"""The two-tower CLIP model: normalised embeddings plus the learnable temperature (and SigLIP's bias)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.audio import AudioConfig, AudioTransformer
from clip_jax.models.layers import TowerOutput
from clip_jax.models.resnet import ModifiedResNet, ResNetConfig
from clip_jax.models.towers import TextConfig, TextTransformer, VisionConfig, VisionTransformer

# Tower types by `model.vision.type` / `model.text.type` / `model.audio.type`: (config dataclass, module).
VISION_TOWERS: dict[str, tuple[type, type[nn.Module]]] = {
    "vit": (VisionConfig, VisionTransformer),
    "resnet": (ResNetConfig, ModifiedResNet),
}
TEXT_TOWERS: dict[str, tuple[type, type[nn.Module]]] = {"transformer": (TextConfig, TextTransformer)}
AUDIO_TOWERS: dict[str, tuple[type, type[nn.Module]]] = {"spectrogram_vit": (AudioConfig, AudioTransformer)}
# The towers by modality (the key of `config.model`), each modality's registry and its default type. vision and text
# are always there; a model has the optional ones whose key its config sets (AudioCLIP's `model.audio`).
TOWERS: dict[str, tuple[dict[str, tuple[type, type[nn.Module]]], str]] = {
    "vision": (VISION_TOWERS, "vit"),
    "text": (TEXT_TOWERS, "transformer"),
    "audio": (AUDIO_TOWERS, "spectrogram_vit"),
}
REQUIRED_TOWERS = ("vision", "text")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    vision: VisionConfig | ResNetConfig
    text: TextConfig
    audio: AudioConfig | None = None
    embed_dim: int = 512
    dtype: str = "float32"  # compute dtype; parameters are always float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention: str = "auto"  # the towers' self-attention: layers.ATTENTION_IMPLEMENTATIONS
    layer_norm: str = "auto"  # the transformer towers' LayerNorms: layers.LAYER_NORM_IMPLEMENTATIONS
    logit_scale_init: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0  # clamp of exp(logit_scale) as in CLIP; <= 0 disables it (Long-CLIP)
    logit_bias_init: float | None = None  # set (e.g. -10) to add SigLIP's learnable bias
    # The RGB mean and standard deviation (of pixels in [0, 1]) the image tower's input is normalised with: OpenAI's,
    # unless the model was trained with others (open_clip's preprocess_cfg, HF's image_mean / image_std).
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        """Builds the config from a plain dict (e.g. `config.model.to_dict()`)."""
        d = dict(d)
        for key in ("image_mean", "image_std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])  # config.json holds a list
        towers = {}
        for modality, (registry, default) in TOWERS.items():
            if (tower := d.pop(modality, None)) is not None:
                towers[modality] = registry[tower.get("type", default)][0].from_dict(dict(tower))
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**towers, **{k: v for k, v in d.items() if k in fields})

# OpenAI CLIP's RGB normalisation, every model's unless its config says otherwise.
CLIP_MEAN = CLIPConfig.image_mean
CLIP_STD = CLIPConfig.image_std


def normalisation_problem(key: str, rgb: Any) -> str | None:
    """Why `rgb` cannot be a model's `image_mean` or `image_std` (`key`), None if it can: three numbers (of pixels in
    [0, 1]), a std's each above 0."""
    std = key == "image_std"
    if (not isinstance(rgb, list | tuple) or len(rgb) != 3 or not all(isinstance(x, int | float) for x in rgb)
            or (std and not all(x > 0 for x in rgb))):
        return "is not three numbers (red, green, blue" + (", each above 0)" if std else ")")
    return None


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def normalize_images(images: jax.Array, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
                     ) -> jax.Array:
    """uint8 RGB images as the towers take them, normalised on device with the RGB `mean` and `std` (of [0, 1]
    pixels; a model's own: `CLIP.normalize`) (4x less host-to-device traffic than float); float images are taken as
    already normalised."""
    if images.dtype != jnp.uint8:
        return images
    return (images.astype(jnp.float32) / 255.0 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def embedding(features: jax.Array, normalize: bool) -> jax.Array:
    """A tower's pooled features as float32 embeddings, L2-normalised unless `normalize` is False."""
    return l2_normalize(features) if normalize else features.astype(jnp.float32)


class CLIP(nn.Module):
    config: CLIPConfig

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        common = dict(embed_dim=cfg.embed_dim, dtype=dtype, scan_layers=cfg.scan_layers, remat_policy=cfg.remat_policy,
                      attention=cfg.attention, layer_norm=cfg.layer_norm)
        self.visual = self.vision_tower(common)
        self.text = TEXT_TOWERS[cfg.text.type][1](cfg.text, **common)
        if cfg.audio is not None:
            self.audio = AUDIO_TOWERS[cfg.audio.type][1](cfg.audio, **common)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(cfg.logit_scale_init), (), jnp.float32)
        if cfg.logit_bias_init is not None:
            self.logit_bias = self.param("logit_bias", nn.initializers.constant(cfg.logit_bias_init), (), jnp.float32)

    def normalize(self, images: jax.Array) -> jax.Array:
        """`normalize_images` with this model's own mean and std."""
        return normalize_images(images, self.config.image_mean, self.config.image_std)

    def vision_tower(self, common: dict[str, Any]) -> nn.Module:
        """The image tower, from `config.vision`'s type; a method's model may build its own (GroupViT's)."""
        return VISION_TOWERS[self.config.vision.type][1](self.config.vision, **common)

    def image_features(self, images: jax.Array, *, layer_prompts: jax.Array | None = None,
                       prompt_layers: jax.Array | None = None, dropout_rng: jax.Array | None = None
                       ) -> TowerOutput:
        """The image tower's pooled feature (unnormalised) and token states. images: uint8 RGB [B, H, W, 3] or float
        images already normalised (`normalize_images`). Deep prompts, patch dropout and stochastic depth (training:
        one key, or one per image; a ViT tower's): see `VisionTransformer`."""
        images = self.normalize(images)
        if dropout_rng is None:
            return self.visual(images, layer_prompts, prompt_layers)
        return self.visual(images, layer_prompts, prompt_layers, dropout_rng=dropout_rng)

    def text_features(self, tokens: jax.Array | None = None, *, token_embeddings: jax.Array | None = None,
                      pool_index: jax.Array | None = None, layer_prompts: jax.Array | None = None,
                      prompt_layers: jax.Array | None = None) -> TowerOutput:
        """The text tower's pooled feature (unnormalised) and token states; see `TextTransformer`."""
        return self.text(tokens, token_embeddings=token_embeddings, pool_index=pool_index,
                         layer_prompts=layer_prompts, prompt_layers=prompt_layers)

    def audio_features(self, waveforms: jax.Array) -> TowerOutput:
        """The audio tower's pooled feature (unnormalised) and token states; waveforms float [B, samples] in
        [-1, 1] at the tower's sample rate. Only for a model with `config.audio`."""
        if self.config.audio is None:
            raise ValueError("this model has no audio tower (model.audio is not set)")
        return self.audio(waveforms)

    def encode_audio(self, waveforms: jax.Array, normalize: bool = True) -> jax.Array:
        """The audio embedding [B, embed_dim], L2-normalised unless `normalize` is False (`audio_features`)."""
        features = self.audio_features(waveforms).pooled
        return embedding(features, normalize)

    def encode_image(self, images: jax.Array, normalize: bool = True, **options) -> jax.Array:
        """The image embedding [B, embed_dim], L2-normalised unless `normalize` is False; `options`: deep prompts,
        patch dropout (`image_features`)."""
        features = self.image_features(images, **options).pooled
        return embedding(features, normalize)

    def dense_logits(self, images: jax.Array, labels: jax.Array) -> jax.Array:
        """Per-location scores [B, h, w, L] of uint8 images against L2-normalised label embeddings [L, embed_dim]:
        the image tower's dense features (`dense_features`, the training-free baseline of a plain CLIP),
        normalised, times the learned temperature. The dense methods (LSeg, GroupViT) override it."""
        images = self.normalize(images)
        features = l2_normalize(self.visual.dense_features(images))
        scale, _ = self.temperature()
        return scale * features @ labels.astype(jnp.float32).T

    def encode_text(
        self,
        tokens: jax.Array | None = None,
        *,
        token_embeddings: jax.Array | None = None,
        pool_index: jax.Array | None = None,
        normalize: bool = True,
        **prompts,
    ) -> jax.Array:
        """The text embedding [B, embed_dim], L2-normalised unless `normalize` is False (`text_features`)."""
        features = self.text_features(tokens, token_embeddings=token_embeddings, pool_index=pool_index,
                                      **prompts).pooled
        return embedding(features, normalize)

    def temperature(self) -> tuple[jax.Array, jax.Array]:
        """(scale, bias): the multiplier of cosine similarities, clamped as configured, and the bias (0 if none)."""
        bias = self.logit_bias if self.config.logit_bias_init is not None else jnp.zeros((), jnp.float32)
        return self.clamped_scale(self.logit_scale), bias

    def clamped_scale(self, log_scale: jax.Array) -> jax.Array:
        """exp(log_scale), clamped to `max_logit_scale` when that is > 0: every temperature of the model."""
        scale = jnp.exp(log_scale)
        return jnp.minimum(scale, self.config.max_logit_scale) if self.config.max_logit_scale > 0 else scale

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
        scale, bias = self.temperature()
        return {
            "image": self.encode_image(images),
            "text": self.encode_text(tokens),
            "logit_scale": scale,
            "logit_bias": bias,
        }
