"""Analytic model FLOPs (2 FLOPs per multiply-add), for MFU.

Counted: every matmul of the towers (patch embedding, q/k/v/out projections, attention scores and values, MLP,
final projections) and every convolution of a ResNet tower. Not counted: norms, softmax, elementwise ops, pooling,
embedding lookups (they are not matmuls).
Causal attention is counted in full, as is customary (the kernels mostly compute it in full anyway).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from clip_jax.models.clip import CLIPConfig
from clip_jax.models.resnet import ResNetConfig, block_plan
from clip_jax.models.towers import TowerConfig


def transformer_flops(cfg: TowerConfig, tokens: int) -> float:
    """Forward FLOPs of one sequence through a stack of pre-LN blocks."""
    attn_width = cfg.heads * cfg.head_dim
    per_token = (
        2 * 3 * cfg.width * attn_width  # fused q/k/v projection
        + 2 * attn_width * cfg.width  # output projection
        + 2 * 2 * tokens * attn_width  # q @ k^T and probs @ v
        + 2 * 2 * cfg.width * cfg.mlp_dim  # c_fc and c_proj
    )
    return float(cfg.layers * tokens * per_token)


def resnet_forward_flops(v: ResNetConfig, embed_dim: int) -> float:
    """Forward FLOPs of a ModifiedResNet: every convolution (2 x output pixels x kernel area x in x out channels)
    and the attention pool's projections and its one query's scores and values."""
    side, half = v.image_size // 2, v.width // 2
    total = 2 * side**2 * 9 * (3 * half + half * half + half * v.width)  # the stem, at half resolution
    for channels, planes, stride, size in block_plan(v):
        out = size // stride
        total += 2 * size**2 * (channels * planes + 9 * planes * planes)  # conv1, conv2 before the pool
        total += 2 * out**2 * 4 * planes * (planes + (channels if stride > 1 or channels != 4 * planes else 0))
    tokens, width = v.grid**2 + 1, v.feature_width
    return total + 2 * width * width * (1 + 2 * tokens) + 2 * 2 * tokens * width + 2 * width * embed_dim


def image_forward_flops(cfg: CLIPConfig, training: bool = False) -> float:
    """training: a ViT's blocks see the patch tokens that patch dropout keeps (`VisionConfig.kept_patches`); the
    patch embedding still sees them all (tokens are dropped after it)."""
    v = cfg.vision
    if isinstance(v, ResNetConfig):
        return resnet_forward_flops(v, cfg.embed_dim)
    patch_embed = 2 * v.num_patches * (3 * v.patch_size**2) * v.width
    tokens = (v.kept_patches if training else v.num_patches) + 1
    return patch_embed + transformer_flops(v, tokens) + 2 * v.width * cfg.embed_dim


def groupvit_forward_flops(cfg: CLIPConfig, stage_depths: tuple[int, ...], num_group_tokens: tuple[int, ...],
                           num_output_groups: tuple[int, ...]) -> float:
    """GroupViT's image tower (models/grouping.py): the patch embedding; each stage's blocks over its tokens and
    group tokens; the group projector of a later stage (a token-mixing MLP, D -> D/2 along the groups); each grouping
    block: its token-mixing MLP, the cross-attention block (group tokens to image tokens, then an MLP), the assignment
    attention (q, k, v and output projections, the logits and the pooling), the channel MLP; the projection."""
    v = cfg.vision
    d, a, half = v.width, v.heads * v.head_dim, v.width // 2
    patches = v.num_patches
    total = 2 * patches * (3 * v.patch_size**2) * d + 2 * d * cfg.embed_dim
    tokens, previous = patches, 0
    for stage, depth in enumerate(stage_depths):
        groups = num_group_tokens[stage]
        total += transformer_flops(dataclasses.replace(v, layers=depth), tokens + groups)
        if stage and groups:
            total += 2 * d * (previous * half + half * groups)  # the group projector
        if groups:
            out = num_output_groups[stage]
            total += 2 * d * (groups * half + half * out)  # token-mixing MLP
            total += 2 * out * d * a + 2 * tokens * d * 2 * a + 2 * 2 * out * tokens * a + 2 * out * a * d
            total += 2 * 2 * (2 * out * d * v.mlp_dim)  # the cross-attention block's MLP and the channel MLP
            total += 2 * (2 * out + 2 * tokens) * d * d + 2 * 2 * out * tokens * d  # assignment attention
            previous, tokens = groups, out
    return float(total)


def audio_forward_flops(cfg: CLIPConfig) -> float:
    """The audio tower (models/audio.py): the mel filterbank matmul, the patch embedding, the blocks over the patches
    and the class token, and the projection. The FFT is not a matmul and is not counted."""
    a = cfg.audio
    times, freqs = a.grid
    mel = 2 * a.frames * (a.n_fft // 2 + 1) * a.n_mels
    patch_embed = 2 * times * freqs * a.patch_time * a.patch_freq * a.width
    return mel + patch_embed + transformer_flops(a, times * freqs + 1) + 2 * a.width * cfg.embed_dim


def text_forward_flops(cfg: CLIPConfig, context_length: int | None = None) -> float:
    t = cfg.text
    tokens = context_length or t.context_length
    return transformer_flops(t, tokens) + 2 * t.width * cfg.embed_dim


def train_flops_per_sample(cfg: CLIPConfig, context_length: int | None = None) -> float:
    """Forward + backward (3x forward) of both towers, the image tower's under patch dropout; recomputation from
    remat is not counted, as MFU convention has it."""
    return 3.0 * (image_forward_flops(cfg, training=True) + text_forward_flops(cfg, context_length))


def pass_factor(trainable: Any) -> float:
    """Forwards a training step costs a module, given its tree of trainable flags: 3 when it trains (the forward,
    the backward to its inputs and to its weights), 1 when frozen. A frozen module that a trained one feeds (a
    frozen text tower under learned prompts) costs 2: its caller says so."""
    return 3.0 if any(bool(t) for t in jax.tree.leaves(trainable)) else 1.0


# Peak dense bf16 FLOP/s per device, by `device_kind` prefix (vendor figures), the first that matches: the PCIe and
# NVL parts before their SXM kin, whose names (e.g. "NVIDIA H100 80GB HBM3") they begin alike.
PEAK_FLOPS: dict[str, float] = {
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def peak_flops_per_device(device_kind: str) -> float | None:
    """Vendor peak for a known accelerator, None otherwise (e.g. CPU: MFU is then not reported)."""
    for prefix, flops in PEAK_FLOPS.items():
        if device_kind.startswith(prefix):
            return flops
    return None
