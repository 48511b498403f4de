"""The image and text towers of CLIP (OpenAI architecture), plus their configs.

Towers are registered by name (`VISION_TOWERS`, `TEXT_TOWERS` in models/clip.py) so that other architectures
(ModifiedResNet in models/resnet.py, GroupViT, an audio tower) plug into the same `CLIP` module and trainer through
the config's `type` field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.layers import (
    Dtype,
    LayerNorm,
    PatchEmbedding,
    TowerOutput,
    Transformer,
    class_token_and_positions,
    keep_random_patches,
    layer_norm,
    partitioned,
    stochastic_depth_scales,
)
from clip_jax.models.positions import merge_position_tables


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """Fields shared by every transformer tower. `heads * head_dim` need not equal `width` (ViT-bigG's does not)."""

    width: int
    layers: int
    heads: int
    head_dim: int
    mlp_dim: int
    activation: str = "quick_gelu"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TowerConfig:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


# How a ViT pools its tokens into the image's feature: "token", the class token (OpenAI's CLIP, and what the PyTorch
# layouts hold); "mean", the mean of the patch tokens (big_vision's "gap", open_clip's pool_type "avg"), each through
# ln_post first, as both of those do.
VISION_POOLS = ("token", "mean")

# VisionConfig's fields of a training image's random drops, with what each value means: the training step applies
# them from each example's own key (`Method.image_dropout`); evaluation and inference never drop.
IMAGE_DROPOUT_FIELDS = {
    "patch_dropout": "the fraction of its patches a training image drops",
    "stochastic_depth": "the probability that a training image skips a residual branch of the last block",
}


@dataclasses.dataclass(frozen=True)
class VisionConfig(TowerConfig):
    type: str = "vit"
    patch_size: int = 32
    image_size: int = 224
    # Patch dropout (FLIP, Li et al. 2023; open_clip's `patch_dropout`): the fraction of patch tokens a training
    # step drops at random per image, after the positions are added; the class token always stays. Evaluation and
    # inference see every patch. Fewer tokens make the step cheaper (the blocks' cost is linear to quadratic in
    # them), at some cost in accuracy per example seen.
    patch_dropout: float = 0.0
    # Stochastic depth (Huang et al. 2016; DeiT's and timm's `drop_path_rate`): a training image skips each residual
    # branch of the last block with this probability, of earlier blocks with linearly less, of the first never
    # (`layers.stochastic_depth_scales`). Evaluation and inference run every block. It costs no time and saves none:
    # the skipped branches are computed and multiplied by 0.
    stochastic_depth: float = 0.0
    pool: str = "token"  # VISION_POOLS

    @property
    def feature_width(self) -> int:
        """The width of the pooled feature before the projection (`TowerOutput.feature`)."""
        return self.width

    @property
    def grid(self) -> int:
        """Patches along each side of the image (the token grid that dense heads read; ResNetConfig.grid too)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def kept_patches(self) -> int:
        """Patch tokens a training step keeps under `patch_dropout` (at least one; rounded down, as open_clip)."""
        return max(1, int(self.num_patches * (1 - self.patch_dropout)))


@dataclasses.dataclass(frozen=True)
class TextConfig(TowerConfig):
    type: str = "transformer"
    vocab_size: int = 49408
    context_length: int = 77
    # Long-CLIP: > 0 gives two position tables, `positional_embedding` for positions below this and
    # `positional_embedding_res` for the rest, so that a config can freeze the first (kept) positions alone.
    keep_positions: int = 0


class VisionTransformer(nn.Module):
    """ViT image tower: patchify (conv without bias), class token, learned positions, ln_pre, blocks, ln_post on
    the class token (or on the patch tokens, then their mean: `config.pool`), projection."""

    config: VisionConfig
    embed_dim: int
    dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention: str = "auto"  # layers.ATTENTION_IMPLEMENTATIONS
    layer_norm: str = "auto"  # layers.LAYER_NORM_IMPLEMENTATIONS

    @nn.compact
    def __call__(self, images: jax.Array, layer_prompts: jax.Array | None = None,
                 prompt_layers: jax.Array | None = None, *, dropout_rng: jax.Array | None = None
                 ) -> TowerOutput:
        """images: float [B, H, W, 3], already normalised. `layer_prompts` [layers, M, width] (deep prompting,
        MaPLe): layer 0's are appended after the patch tokens, later layers replace them (`Transformer`).
        `dropout_rng` (training; one key, or one per image [B, 2]): each image keeps a random
        `config.kept_patches` of its patch tokens and skips random residual branches (`config.stochastic_depth`);
        without it, or with both fields 0, every patch and every branch."""
        cfg = self.config
        if images.shape[1:3] != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"image tower expects {cfg.image_size}x{cfg.image_size} images, got {images.shape[1]}x"
                f"{images.shape[2]}; resize them or set model.vision.image_size"
            )
        scale = cfg.width**-0.5
        x = PatchEmbedding(cfg.width, cfg.patch_size, self.dtype, name="conv1")(images)
        batch = x.shape[0]
        x = class_token_and_positions(self, x.reshape(batch, -1, cfg.width), self.dtype)
        if dropout_rng is not None and cfg.patch_dropout > 0:
            x = keep_random_patches(x, cfg.kept_patches, dropout_rng)
        prompt_start = x.shape[1]
        if layer_prompts is not None:
            first = jnp.broadcast_to(layer_prompts[0].astype(self.dtype), (batch, *layer_prompts.shape[1:]))
            x = jnp.concatenate([x, first], axis=1)
        x = LayerNorm(self.dtype, implementation=self.layer_norm, name="ln_pre")(x)
        branch_scales = None
        if dropout_rng is not None and cfg.stochastic_depth > 0:
            branch_scales = stochastic_depth_scales(dropout_rng, cfg.layers, cfg.stochastic_depth, batch)
        x = Transformer(
            cfg.layers, cfg.heads, cfg.head_dim, cfg.mlp_dim, cfg.activation, causal=False,
            scan_layers=self.scan_layers, remat_policy=self.remat_policy, dtype=self.dtype, attention=self.attention,
            layer_norm=self.layer_norm, prompt_start=prompt_start, name="transformer",
        )(x, layer_prompts, prompt_layers, branch_scales)
        ln_post = LayerNorm(self.dtype, name="ln_post")
        # the patch tokens are those between the class token and any prompts (fewer under patch dropout)
        pooled = ln_post(x[:, 1:prompt_start]).mean(axis=1) if cfg.pool == "mean" else ln_post(x[:, 0])
        proj = self.param(
            "proj", partitioned(nn.initializers.normal(scale), ("embed", "proj")), (cfg.width, self.embed_dim),
            jnp.float32,
        )
        return TowerOutput(pooled @ proj.astype(self.dtype), x, pooled)

    def token_grid(self, images: jax.Array) -> jax.Array:
        """The last block's patch tokens as a grid [B, grid, grid, width] (before ln_post): what dense heads read."""
        grid = self.config.grid
        tokens = self(images).tokens[:, 1:]  # the class token first
        return tokens.reshape(tokens.shape[0], grid, grid, tokens.shape[-1])

    def dense_features(self, images: jax.Array) -> jax.Array:
        """Per-patch features in the joint embedding space, unnormalised [B, grid, grid, embed_dim]: the patch
        tokens through the pooled feature's head (ln_post, then the projection). A plain CLIP was never trained to
        align them with text; read this way they are the training-free dense baseline (MaskCLIP's idea, without
        its last-layer value-path change)."""
        grid = self.token_grid(images)
        params = self.variables["params"]
        return layer_norm(grid, params["ln_post"]).astype(self.dtype) @ params["proj"].astype(self.dtype)


class TextTransformer(nn.Module):
    """Causal text transformer pooled at the end-of-text token.

    Accepts token ids, or ready token embeddings (prompt learning: learned context vectors in place of word
    embeddings) together with the ids or explicit pooling positions.
    """

    config: TextConfig
    embed_dim: int
    dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention: str = "auto"  # layers.ATTENTION_IMPLEMENTATIONS
    layer_norm: str = "auto"  # layers.LAYER_NORM_IMPLEMENTATIONS

    def setup(self):
        cfg = self.config
        self.token_embedding = nn.Embed(
            cfg.vocab_size,
            cfg.width,
            embedding_init=partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
            name="token_embedding",
        )
        positions = (
            partitioned(nn.initializers.normal(0.01), ("positions", "embed")), (cfg.context_length, cfg.width),
            jnp.float32,
        )
        self.positional_embedding = self.param("positional_embedding", *positions)
        if cfg.keep_positions:
            self.positional_embedding_res = self.param("positional_embedding_res", *positions)
        self.transformer = Transformer(
            cfg.layers, cfg.heads, cfg.head_dim, cfg.mlp_dim, cfg.activation, causal=True,
            scan_layers=self.scan_layers, remat_policy=self.remat_policy, dtype=self.dtype, attention=self.attention,
            layer_norm=self.layer_norm,
        )
        self.ln_final = LayerNorm(self.dtype, implementation=self.layer_norm)
        self.text_projection = self.param(
            "text_projection",
            partitioned(nn.initializers.normal(cfg.width**-0.5), ("embed", "proj")),
            (cfg.width, self.embed_dim),
            jnp.float32,
        )

    def positions(self) -> jax.Array:
        """The [context_length, width] position table in use (Long-CLIP's two tables merged)."""
        if not self.config.keep_positions:
            return self.positional_embedding
        return merge_position_tables(self.positional_embedding, self.positional_embedding_res,
                                     self.config.keep_positions)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Word embeddings [B, T, width] of token ids, e.g. to splice learned prompt vectors between them."""
        return self.token_embedding(tokens)

    def __call__(
        self,
        tokens: jax.Array | None = None,
        *,
        token_embeddings: jax.Array | None = None,
        pool_index: jax.Array | None = None,
        layer_prompts: jax.Array | None = None,
        prompt_layers: jax.Array | None = None,
    ) -> TowerOutput:
        """The pooled feature and the token states (`TowerOutput`).

        tokens: int [B, T] (T <= context_length). Pooling is at argmax(tokens): the end-of-text token has the
        largest id, as in OpenAI's vocabulary (and in vocabularies trained by `ClipTokenizer.train`).
        token_embeddings: [B, T, width] in place of the embedding lookup; then `pool_index` [B] or `tokens`
        must say where to pool.
        layer_prompts: [layers, M, width], deep prompts (MaPLe) at positions 1..M (after the start token): the
        caller puts layer 0's in `token_embeddings`, later layers replace them (`Transformer`).
        """
        if token_embeddings is None:
            if tokens is None:
                raise ValueError("encode_text needs tokens or token_embeddings")
            token_embeddings = self.embed_tokens(tokens)
        if pool_index is None:
            if tokens is None:
                raise ValueError("with token_embeddings, pass pool_index (or the tokens) to locate end-of-text")
            pool_index = jnp.argmax(tokens, axis=-1)
        length = token_embeddings.shape[1]
        if length > self.config.context_length:
            raise ValueError(
                f"text of {length} tokens exceeds the model's context_length {self.config.context_length}; "
                "tokenize with truncation to the context length"
            )
        x = token_embeddings.astype(self.dtype) + self.positions()[:length].astype(self.dtype)
        tokens = self.transformer(x, layer_prompts, prompt_layers)
        x = self.ln_final(tokens)
        # Pooling as a one-hot contraction rather than a gather: it partitions cleanly under any sharding.
        pooled = jnp.einsum("btd,bt->bd", x, jax.nn.one_hot(pool_index, length, dtype=x.dtype))
        return TowerOutput(pooled @ self.text_projection.astype(self.dtype), tokens, pooled)

