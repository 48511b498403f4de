"""The OpenAI / open_clip layout of a ModifiedResNet image tower (models/resnet.py): its rows of the layout table
(`openai.layout`), its BatchNorms folded into our per-channel affine and back, and its architecture read off the
tensor shapes. Hugging Face's `CLIPModel` has no ResNet image tower, so there is no HF layout for it.

Folding: a BatchNorm in evaluation mode computes `(x - mean) / sqrt(var + eps) * weight + bias`, which is
`x * scale + bias'` with scale = weight / sqrt(var + eps) and bias' = bias - mean * scale. Import folds every
BatchNorm into (scale, bias'); export writes them back as `weight = scale`, `bias = bias'` with running_mean 0 and
running_var 1 - eps, which computes the same in evaluation mode. A round trip therefore keeps every function the
model computes (to float32 rounding) but not the running statistics' values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from clip_jax.interop import ConversionError
from clip_jax.models.resnet import BATCH_NORM_EPS, STRIDE

_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
# An image tower BatchNorm's weight: the stem's bn1-3, each block's bn1-3 and its shortcut's downsample.1.
_BATCH_NORM_WEIGHT = re.compile(r"^visual\.(?:.+\.)?(?:bn\d+|downsample\.1)\.weight$")


def resnet_rows(v: Mapping[str, Any], embed_dim: int) -> list[tuple]:
    """[(torch key, our path, torch shape, transform, tower config)] of the image tower (BatchNorms folded)."""
    rows: list[tuple] = []

    def conv(torch_name: str, ours: str, out: int, inp: int, size: int) -> None:
        rows.append((f"visual.{torch_name}.weight", f"visual/{ours}/kernel", (out, inp, size, size), "conv", v))

    def norm(torch_name: str, ours: str, channels: int) -> None:
        rows.append((f"visual.{torch_name}.weight", f"visual/{ours}/scale", (channels,), "same", v))
        rows.append((f"visual.{torch_name}.bias", f"visual/{ours}/bias", (channels,), "same", v))

    width, half = v["width"], v["width"] // 2
    for i, (out, inp) in enumerate(((half, 3), (half, half), (width, half)), start=1):
        conv(f"conv{i}", f"conv{i}", out, inp, 3)
        norm(f"bn{i}", f"bn{i}", out)
    channels = width
    for stage, blocks in enumerate(v["layers"], start=1):
        planes = width * 2 ** (stage - 1)
        for j in range(blocks):
            t, o = f"layer{stage}.{j}", f"layer{stage}_{j}"
            conv(f"{t}.conv1", f"{o}/conv1", planes, channels, 1)
            norm(f"{t}.bn1", f"{o}/bn1", planes)
            conv(f"{t}.conv2", f"{o}/conv2", planes, planes, 3)
            norm(f"{t}.bn2", f"{o}/bn2", planes)
            conv(f"{t}.conv3", f"{o}/conv3", 4 * planes, planes, 1)
            norm(f"{t}.bn3", f"{o}/bn3", 4 * planes)
            if j == 0 and (stage > 1 or channels != 4 * planes):
                conv(f"{t}.downsample.0", f"{o}/downsample_0", 4 * planes, channels, 1)
                norm(f"{t}.downsample.1", f"{o}/downsample_1", 4 * planes)
            channels = 4 * planes
    grid = v["image_size"] // STRIDE
    rows.append(("visual.attnpool.positional_embedding", "visual/attnpool/positional_embedding",
                 (grid * grid + 1, channels), "same", v))
    for name in ("q_proj", "k_proj", "v_proj"):
        rows.append((f"visual.attnpool.{name}.weight", f"visual/attnpool/{name}/kernel", (channels, channels),
                     "linear", v))
        rows.append((f"visual.attnpool.{name}.bias", f"visual/attnpool/{name}/bias", (channels,), "same", v))
    rows.append(("visual.attnpool.c_proj.weight", "visual/attnpool/c_proj/kernel", (embed_dim, channels), "linear",
                 v))
    rows.append(("visual.attnpool.c_proj.bias", "visual/attnpool/c_proj/bias", (embed_dim,), "same", v))
    return rows


def fold_batch_norms(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The state dict with every BatchNorm (a prefix with `running_mean`) folded into `weight` (the scale) and
    `bias`, its statistics dropped."""
    out = dict(sd)
    # A dump of the parameters alone (named_parameters) has the affines without the statistics: read as folded
    # scales, they would compute another function.
    unfolded = [key for key in sd if _BATCH_NORM_WEIGHT.match(key)
                and f"{key[: -len('.weight')]}.running_mean" not in sd]
    if unfolded:
        raise ConversionError(f"{len(unfolded)} BatchNorms of the image tower, the first {unfolded[0]!r}, have a "
                              "weight but no running statistics (running_mean, running_var): a dump of the parameters "
                              "alone leaves them out; save the model's state_dict(), which holds them")
    for key in sd:
        if not key.endswith(".running_mean"):
            continue
        prefix = key[: -len(".running_mean")]
        missing = [f"{prefix}.{n}" for n in ("weight", "bias", "running_var") if f"{prefix}.{n}" not in sd]
        if missing:
            raise ConversionError(f"BatchNorm {prefix!r} has running_mean but no {', '.join(missing)}")
        statistics = {n: np.asarray(sd[f"{prefix}.{n}"], np.float64) for n in ("running_mean", "running_var")}
        bad = [n for n, v in statistics.items() if not np.isfinite(v).all() or (n == "running_var" and (v < 0).any())]
        if bad:  # named here: folded, they would show as NaN in the weight and bias
            raise ConversionError(f"BatchNorm {prefix!r} has a damaged {' and '.join(bad)} (NaN, infinite or a "
                                  "negative variance): the checkpoint is damaged; convert another one")
        mean = np.asarray(sd[key], np.float64)
        scale = np.asarray(sd[f"{prefix}.weight"], np.float64) / np.sqrt(
            np.asarray(sd[f"{prefix}.running_var"], np.float64) + BATCH_NORM_EPS)
        out[f"{prefix}.bias"] = (np.asarray(sd[f"{prefix}.bias"], np.float64) - mean * scale).astype(np.float32)
        out[f"{prefix}.weight"] = scale.astype(np.float32)
        for statistic in _STATISTICS:
            out.pop(f"{prefix}.{statistic}", None)
    return out


def unfold_batch_norms(sd: Mapping[str, np.ndarray], rows: list[tuple]) -> dict[str, np.ndarray]:
    """Adds the statistics of a neutral BatchNorm (mean 0, var 1 - eps, so that sqrt(var + eps) = 1) to every
    folded one of the image tower among `rows`, so that PyTorch loads the state dict strictly and computes the same."""
    out = dict(sd)
    for key, path, shape, _, _ in rows:
        if key.startswith("visual.") and path.endswith("/scale"):
            prefix = key[: -len(".weight")]
            out[f"{prefix}.running_mean"] = np.zeros(shape, np.float32)
            out[f"{prefix}.running_var"] = np.full(shape, 1.0 - BATCH_NORM_EPS, np.float32)
            out[f"{prefix}.num_batches_tracked"] = np.zeros((), np.int64)
    return out


def is_resnet(sd: Mapping[str, Any]) -> bool:
    return "visual.layer1.0.conv1.weight" in sd


def infer_resnet(sd: Mapping[str, np.ndarray], heads: int | None = None) -> tuple[dict[str, Any], int]:
    """(`model.vision` dict, embed_dim) of a ModifiedResNet state dict. Heads are not in the shapes: the attention
    pool's width / 64 unless given (as OpenAI's)."""
    layers = []
    for stage in range(1, 5):
        pattern = re.compile(rf"visual\.layer{stage}\.(\d+)\.")
        found = [int(m.group(1)) for k in sd if (m := pattern.match(k))]
        if not found:
            raise ConversionError(f"a ResNet state dict without 'visual.layer{stage}.*' keys: ModifiedResNets have "
                                  "four stages (layer1 ... layer4)")
        layers.append(max(found) + 1)
    width = int(sd["visual.conv1.weight"].shape[0]) * 2
    positions = sd.get("visual.attnpool.positional_embedding")
    if positions is None:
        raise ConversionError("a ResNet state dict without 'visual.attnpool.positional_embedding'")
    grid = math.isqrt(positions.shape[0] - 1)
    if grid * grid != positions.shape[0] - 1:
        raise ConversionError(f"visual.attnpool.positional_embedding has {positions.shape[0]} rows: not 1 + a square "
                              "grid")
    pool_width = 32 * width
    n = heads or max(pool_width // 64, 1)
    if heads is not None and (heads < 1 or pool_width % heads):
        raise ConversionError(f"--heads-vision {heads}: must be a positive divisor of the attention pool's width "
                              f"{pool_width}")
    vision = {"type": "resnet", "layers": tuple(layers), "width": width, "heads": n, "image_size": grid * STRIDE,
              "norm": "frozen_bn"}
    return vision, int(sd["visual.attnpool.c_proj.weight"].shape[0])


def open_clip_vision_config(v: Mapping[str, Any]) -> dict[str, Any]:
    """open_clip's `vision_cfg` of a ResNet tower (open_clip builds a ModifiedResNet when `layers` is a list; its
    heads are width * 32 // head_width)."""
    return {"image_size": v["image_size"], "layers": list(v["layers"]), "width": v["width"],
            "head_width": 32 * v["width"] // v["heads"]}


def check_exportable(v: Mapping[str, Any]) -> None:
    if v["norm"] != "frozen_bn":
        raise ConversionError(f"a ResNet image tower with norm {v['norm']!r} has no OpenAI / open_clip layout (their "
                              "ResNets use BatchNorm): only model.vision.norm 'frozen_bn' exports")
