"""OpenAI's ModifiedResNet image tower (the RN50 / RN101 / RN50x4 / x16 / x64 CLIPs), registered as vision type
"resnet".

The architecture, as in the OpenAI checkpoints: a stem of three 3x3 convolutions (the first with stride 2) and a
2x2 average pool; four stages of bottleneck blocks (1x1, 3x3, 1x1 convolutions, expansion 4) whose downsampling is
anti-aliased (a 2x2 average pool before a stride-1 convolution, in the main path and in the shortcut); and an
attention pool: the final grid's mean is prepended as an extra token, a learned position table is added, and the
mean token is the only query of one multi-head attention over all tokens, whose output projection (`c_proj`)
gives the embedding. Every convolution is bias-free.

Normalisation (`norm`):
- "frozen_bn": BatchNorm in evaluation mode, folded into a per-channel affine `x * scale + bias` (scale =
  gamma / sqrt(running_var + eps), bias = beta - running_mean * scale). This is exactly what an imported
  checkpoint computes (OpenAI returns its models in eval mode), it holds no statistics that a step would have to
  update, and the affine stays trainable (as detectron2's FrozenBatchNorm2d for fine-tuning backbones). Trained
  from scratch it is a network without normalisation whose residual branches start at zero (each block's last
  scale is zero-initialised, as in OpenAI's init), which trains at small depth only.
- "group": GroupNorm (32 groups, fewer where a layer has fewer channels): normalisation that needs no batch
  statistics, for training from scratch. A model trained with it has no OpenAI / open_clip layout (no export).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.layers import REMAT_POLICIES, Dtype, TowerOutput, constrain, dot_product_attention, partitioned

NORMS = ("frozen_bn", "group")
BATCH_NORM_EPS = 1e-5  # PyTorch's BatchNorm2d default, which the OpenAI checkpoints use
GROUPS = 32
STRIDE = 32  # total downsampling: image_size / 32 is the attention pool's grid


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """`width` is the stem's output channels (64 for RN50); the stages have 4x, 8x, 16x, 32x `width` output
    channels, and the attention pool works at 32 * width with `heads` heads (OpenAI: 32 * width / 64)."""

    type: str = "resnet"
    layers: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    heads: int = 32
    image_size: int = 224
    norm: str = "frozen_bn"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResNetConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in fields}
        if "layers" in d:
            d["layers"] = tuple(int(n) for n in d["layers"])  # config.json holds a list
        return cls(**d)

    @property
    def feature_width(self) -> int:
        """The width of the pooled feature before the projection (`TowerOutput.feature`), and of the last stage."""
        return 32 * self.width

    @property
    def grid(self) -> int:
        return self.image_size // STRIDE


def block_plan(cfg: ResNetConfig) -> list[tuple[int, int, int, int]]:
    """(input channels, planes, stride, input side) of every bottleneck block, in order; a block outputs 4 * planes
    channels at side input side / stride."""
    plan, channels, side = [], cfg.width, cfg.image_size // 4  # the stem downsamples 4x
    for stage, blocks in enumerate(cfg.layers, start=1):
        planes = cfg.width * 2 ** (stage - 1)
        for j in range(blocks):
            stride = 2 if stage > 1 and j == 0 else 1
            plan.append((channels, planes, stride, side))
            channels, side = 4 * planes, side // stride
    return plan


def config_problem(v: dict[str, Any]) -> str | None:
    """Why a `model.vision` dict of type "resnet" cannot build a tower (one line naming the key), or None."""
    layers = v.get("layers")
    if not isinstance(layers, tuple | list) or len(layers) != 4 or not all(isinstance(n, int) and n >= 1
                                                                          for n in layers):
        return f"model.vision.layers must be 4 block counts >= 1 for a resnet (RN50: (3, 4, 6, 3)), got {layers!r}"
    for key in ("width", "heads", "image_size"):
        if v[key] < 1:
            return f"config key 'model.vision.{key}' must be >= 1, got {v[key]}"
    if v["width"] % 2:
        return f"model.vision.width {v['width']} must be even (the stem's first convolutions have width / 2)"
    if v["image_size"] % STRIDE:
        return f"model.vision.image_size {v['image_size']} must be a multiple of {STRIDE} for a resnet"
    if (32 * v["width"]) % v["heads"]:
        return (f"model.vision.heads {v['heads']} must divide the attention pool's width 32 * width = "
                f"{32 * v['width']}")
    if v["norm"] not in NORMS:
        return f"unknown model.vision.norm {v['norm']!r}; choose one of {', '.join(NORMS)}"
    return None


def conv2d(features: int, size: int, name: str, dtype: Dtype, stride: int = 1) -> nn.Conv:
    # He-normal init (fan-in, ReLU gain): it keeps activations at unit scale through the ReLUs, which a network
    # without normalisation ("frozen_bn" from scratch) needs; under GroupNorm the scale does not matter.
    return nn.Conv(
        features, (size, size), strides=stride, padding=[(size // 2, size // 2)] * 2, use_bias=False,
        kernel_init=partitioned(nn.initializers.he_normal(), ("patch", "patch", "channels_in", "channels")),
        dtype=dtype, name=name,
    )


class Norm(nn.Module):
    """The tower's normalisation (module docstring); float32 whatever the compute dtype. `zero_init`: the scale
    starts at 0 (the last norm of a residual branch)."""

    kind: str
    zero_init: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        init = nn.initializers.zeros if self.zero_init else nn.initializers.ones
        scale = self.param("scale", partitioned(init, ("norm",)), (channels,), jnp.float32)
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("norm",)), (channels,), jnp.float32)
        x = x.astype(jnp.float32)
        if self.kind == "group":
            groups = math.gcd(GROUPS, channels)
            grouped = x.reshape(*x.shape[:-1], groups, channels // groups)
            mean = grouped.mean(axis=(1, 2, 4), keepdims=True)
            var = jnp.square(grouped - mean).mean(axis=(1, 2, 4), keepdims=True)
            x = ((grouped - mean) * jax.lax.rsqrt(var + BATCH_NORM_EPS)).reshape(x.shape)
        return (x * scale + bias).astype(self.dtype)


def _avg_pool(x: jax.Array, size: int) -> jax.Array:
    return nn.avg_pool(x, (size, size), strides=(size, size), padding="VALID") if size > 1 else x


class Bottleneck(nn.Module):
    planes: int
    stride: int
    norm: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_channels = 4 * self.planes
        y = nn.relu(Norm(self.norm, dtype=self.dtype, name="bn1")(conv2d(self.planes, 1, "conv1", self.dtype)(x)))
        y = nn.relu(Norm(self.norm, dtype=self.dtype, name="bn2")(conv2d(self.planes, 3, "conv2", self.dtype)(y)))
        y = _avg_pool(y, self.stride)
        y = conv2d(out_channels, 1, "conv3", self.dtype)(y)
        y = Norm(self.norm, zero_init=True, dtype=self.dtype, name="bn3")(y)
        if self.stride > 1 or x.shape[-1] != out_channels:
            x = conv2d(out_channels, 1, "downsample_0", self.dtype)(_avg_pool(x, self.stride))
            x = Norm(self.norm, dtype=self.dtype, name="downsample_1")(x)
        return nn.relu(y + x)


class AttentionPool(nn.Module):
    """Multi-head attention with the grid's mean token as the only query (module docstring): (the output
    projected by `c_proj`, the attended mean token before it)."""

    heads: int
    out_dim: int
    dtype: Dtype = jnp.float32
    implementation: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        batch, tokens, width = x.shape
        positions = self.param(
            "positional_embedding", partitioned(nn.initializers.normal(width**-0.5), ("positions", "embed")),
            (tokens + 1, width), jnp.float32,
        )
        x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1) + positions.astype(self.dtype)

        def dense(features, name, names):
            return nn.Dense(features, dtype=self.dtype, name=name,
                            kernel_init=partitioned(nn.initializers.normal(width**-0.5), names),
                            bias_init=partitioned(nn.initializers.zeros, (names[1],)))

        head_dim = width // self.heads
        split = lambda y: y.reshape(batch, -1, self.heads, head_dim)
        q = split(dense(width, "q_proj", ("embed", "heads"))(x[:, :1]))
        k = split(dense(width, "k_proj", ("embed", "heads"))(x))
        v = split(dense(width, "v_proj", ("embed", "heads"))(x))
        out = dot_product_attention(q, k, v, implementation=self.implementation)  # scaled by head_dim^-0.5
        out = out.reshape(batch, width)
        return dense(self.out_dim, "c_proj", ("heads", "proj"))(out), out


class ModifiedResNet(nn.Module):
    config: ResNetConfig
    embed_dim: int
    dtype: Dtype = jnp.float32
    scan_layers: bool = False  # a ResNet's stages differ in shape: nothing to scan; accepted for a uniform API
    remat_policy: str = "none"
    attention: str = "auto"  # the attention pool's implementation (layers.ATTENTION_IMPLEMENTATIONS)
    layer_norm: str = "auto"  # taken with the other towers' common fields; a ModifiedResNet has no LayerNorm

    @nn.compact
    def __call__(self, images: jax.Array, layer_prompts: jax.Array | None = None,
                 prompt_layers: jax.Array | None = None) -> TowerOutput:
        """images: float [B, H, W, 3], already normalised. Returns the attention-pooled embedding and the final
        grid's features [B, (image_size / 32)^2, 32 * width] as tokens."""
        cfg = self.config
        if layer_prompts is not None:
            raise ValueError("a resnet image tower takes no deep prompts (MaPLe needs a ViT image tower)")
        if images.shape[1:3] != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"image tower expects {cfg.image_size}x{cfg.image_size} images, got {images.shape[1]}x"
                f"{images.shape[2]}; resize them or set model.vision.image_size"
            )
        x = images.astype(self.dtype)
        half = cfg.width // 2
        for i, (features, stride) in enumerate(((half, 2), (half, 1), (cfg.width, 1)), start=1):
            x = conv2d(features, 3, f"conv{i}", self.dtype, stride)(x)
            x = nn.relu(Norm(cfg.norm, dtype=self.dtype, name=f"bn{i}")(x))
        x = _avg_pool(x, 2)
        policy = REMAT_POLICIES[self.remat_policy]
        block = nn.remat(Bottleneck, policy=policy) if self.remat_policy != "none" else Bottleneck
        stage_blocks = [(stage, j) for stage, blocks in enumerate(cfg.layers, start=1) for j in range(blocks)]
        for (stage, j), (_, planes, stride, _) in zip(stage_blocks, block_plan(cfg), strict=True):
            x = block(planes, stride, cfg.norm, self.dtype, name=f"layer{stage}_{j}")(x)
            x = constrain(x, ("batch", None, None, "act_embed"))
        tokens = x.reshape(x.shape[0], -1, x.shape[-1])
        pooled, feature = AttentionPool(cfg.heads, self.embed_dim, self.dtype, self.attention, name="attnpool")(tokens)
        return TowerOutput(pooled, tokens, feature)

    def token_grid(self, images: jax.Array) -> jax.Array:
        """The final feature grid [B, grid, grid, channels] (before the attention pool): what dense heads read."""
        tokens = self(images).tokens
        return tokens.reshape(tokens.shape[0], self.config.grid, self.config.grid, tokens.shape[-1])

    def dense_features(self, images: jax.Array) -> jax.Array:
        """Per-position features in the joint embedding space, unnormalised [B, grid, grid, embed_dim]: each
        position of the final grid through the attention pool's value and output projections, as if it attended
        only to itself (MaskCLIP's reading of a plain CLIP ResNet, training-free)."""
        grid = self.token_grid(images)
        pool = self.variables["params"]["attnpool"]
        x = grid + pool["positional_embedding"][1:].reshape(grid.shape[1:]).astype(self.dtype)  # row 0: the mean
        for name in ("v_proj", "c_proj"):
            x = x @ pool[name]["kernel"].astype(self.dtype) + pool[name]["bias"].astype(self.dtype)
        return x
