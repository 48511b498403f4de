"""Analytic model FLOPs (2 FLOPs per multiply-add), for MFU.

Counted: every matmul of the towers (patch embedding, q/k/v/out projections, attention scores and values, MLP,
final projections). Not counted: norms, softmax, elementwise ops, embedding lookups (they are not matmuls).
Causal attention is counted in full, as is customary (the kernels mostly compute it in full anyway).
"""

from __future__ import annotations

from typing import Any

import jax

from clip_jax.models.clip import CLIPConfig
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


def image_forward_flops(cfg: CLIPConfig) -> float:
    v = cfg.vision
    patches = (v.image_size // v.patch_size) ** 2
    patch_embed = 2 * patches * (3 * v.patch_size**2) * v.width
    return patch_embed + transformer_flops(v, patches + 1) + 2 * v.width * cfg.embed_dim


def text_forward_flops(cfg: CLIPConfig, context_length: int | None = None) -> float:
    t = cfg.text
    tokens = context_length or t.context_length
    return transformer_flops(t, tokens) + 2 * t.width * cfg.embed_dim


def train_flops_per_sample(cfg: CLIPConfig, context_length: int | None = None) -> float:
    """Forward + backward (3x forward) of both towers; recomputation from remat is not counted, as MFU convention
    has it."""
    return 3.0 * (image_forward_flops(cfg) + text_forward_flops(cfg, context_length))


def pass_factor(trainable: Any) -> float:
    """Forwards a training step costs a module, given its tree of trainable flags: 3 when it trains (the forward,
    the backward to its inputs and to its weights), 1 when frozen. A frozen module that a trained one feeds (a
    frozen text tower under learned prompts) costs 2: its caller says so."""
    return 3.0 if any(bool(t) for t in jax.tree.leaves(trainable)) else 1.0


# Peak dense bf16 FLOP/s per device, by `device_kind` prefix (vendor figures; H100/H200 SXM).
PEAK_FLOPS: dict[str, float] = {
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
