"""Model size presets. Each returns a plain dict that becomes `config.model` (every field explicit and
overridable, e.g. `--config.model.vision.layers=6`)."""

from __future__ import annotations

from typing import Any

# name: (image width, layers, heads, patch, resolution | text width, layers, heads | embed_dim)
_SIZES: dict[str, tuple[int, int, int, int, int, int, int, int, int]] = {
    "tiny": (128, 4, 2, 16, 64, 128, 2, 2, 128),
    "B/32": (768, 12, 12, 32, 224, 512, 12, 8, 512),
    "B/16": (768, 12, 12, 16, 224, 512, 12, 8, 512),
    "L/14": (1024, 24, 16, 14, 224, 768, 12, 12, 768),
    "L/14-336": (1024, 24, 16, 14, 336, 768, 12, 12, 768),
}
PRESETS = tuple(_SIZES)


def model_preset(name: str, activation: str = "quick_gelu", vocab_size: int = 49408, context_length: int = 77
                 ) -> dict[str, Any]:
    """The architecture of a named preset as a config dict (OpenAI sizes; 4x MLP; head width = width / heads)."""
    if name not in _SIZES:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    iw, il, ih, patch, res, tw, tl, th, embed_dim = _SIZES[name]
    return {
        "vision": {
            "type": "vit", "width": iw, "layers": il, "heads": ih, "head_dim": iw // ih, "mlp_dim": 4 * iw,
            "activation": activation, "patch_size": patch, "image_size": res,
        },
        "text": {
            "type": "transformer", "width": tw, "layers": tl, "heads": th, "head_dim": tw // th, "mlp_dim": 4 * tw,
            "activation": activation, "vocab_size": vocab_size, "context_length": context_length,
            "keep_positions": 0,
        },
        "embed_dim": embed_dim,
        "dtype": "float32",
        "scan_layers": False,
        "remat_policy": "none",
        "logit_scale_init": 2.659260036932778,  # ln(1 / 0.07)
        "max_logit_scale": 100.0,
        "logit_bias_init": None,
    }
