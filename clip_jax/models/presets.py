"""Model size presets. Each returns a plain dict that becomes `config.model` (every field explicit and
overridable, e.g. `--config.model.vision.layers=6`)."""

from __future__ import annotations

from typing import Any

from clip_jax.models.clip import CLIP_MEAN, CLIP_STD
from clip_jax.models.towers import IMAGE_DROPOUT_FIELDS

# name: (image width, layers, heads, patch, resolution | text width, layers, heads | embed_dim)
_SIZES: dict[str, tuple[int, int, int, int, int, int, int, int, int]] = {
    "tiny": (128, 4, 2, 16, 64, 128, 2, 2, 128),
    "B/32": (768, 12, 12, 32, 224, 512, 12, 8, 512),
    "B/16": (768, 12, 12, 16, 224, 512, 12, 8, 512),
    "L/14": (1024, 24, 16, 14, 224, 768, 12, 12, 768),
    "L/14-336": (1024, 24, 16, 14, 336, 768, 12, 12, 768),
}
# name: (stage blocks, stem width, resolution | text width, heads | embed_dim); OpenAI's ModifiedResNet CLIPs, whose
# text towers have 12 layers and 64-wide heads, as do their attention pools (32 * width / 64 heads).
_RESNET_SIZES: dict[str, tuple[tuple[int, ...], int, int, int, int, int]] = {
    "RN50": ((3, 4, 6, 3), 64, 224, 512, 8, 1024),
    "RN101": ((3, 4, 23, 3), 64, 224, 512, 8, 512),
    "RN50x4": ((4, 6, 10, 6), 80, 288, 640, 10, 640),
    "RN50x16": ((6, 8, 18, 8), 96, 384, 768, 12, 768),
    "RN50x64": ((3, 15, 36, 10), 128, 448, 1024, 16, 1024),
}
PRESETS = (*_SIZES, *_RESNET_SIZES)


def model_preset(name: str, activation: str = "quick_gelu", vocab_size: int = 49408, context_length: int = 77
                 ) -> dict[str, Any]:
    """The architecture of a named preset as a config dict (OpenAI sizes; ViTs with 4x MLP and head width =
    width / heads; the RN presets have a ModifiedResNet image tower, models/resnet.py)."""
    if name in _RESNET_SIZES:
        blocks, iw, res, tw, th, embed_dim = _RESNET_SIZES[name]
        vision = {"type": "resnet", "layers": blocks, "width": iw, "heads": 32 * iw // 64, "image_size": res,
                  "norm": "frozen_bn"}
        tl = 12
    elif name in _SIZES:
        iw, il, ih, patch, res, tw, tl, th, embed_dim = _SIZES[name]
        vision = {
            "type": "vit", "width": iw, "layers": il, "heads": ih, "head_dim": iw // ih, "mlp_dim": 4 * iw,
            "activation": activation, "patch_size": patch, "image_size": res,
            **dict.fromkeys(IMAGE_DROPOUT_FIELDS, 0.0),  # patch dropout and stochastic depth off
            "pool": "token",  # the class token, as OpenAI's CLIP
        }
    else:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return {
        "vision": vision,
        "text": {
            "type": "transformer", "width": tw, "layers": tl, "heads": th, "head_dim": tw // th, "mlp_dim": 4 * tw,
            "activation": activation, "vocab_size": vocab_size, "context_length": context_length,
            "keep_positions": 0,
        },
        "embed_dim": embed_dim,
        "dtype": "float32",
        "scan_layers": False,
        "remat_policy": "none",
        "attention": "auto",
        "layer_norm": "auto",
        "logit_scale_init": 2.659260036932778,  # ln(1 / 0.07)
        "max_logit_scale": 100.0,
        "logit_bias_init": None,
        "image_mean": CLIP_MEAN,  # OpenAI's RGB normalisation of the image tower's input
        "image_std": CLIP_STD,
    }
