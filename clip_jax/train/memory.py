"""A lower bound on the memory one training step needs per device, checked before any work.

XLA's memory analysis of the compiled step is exact, but compiling (and the data and tokenizer set-up before it)
of a model that cannot fit takes minutes or hours at sizes such as a 32,000-pixel image. This bound counts only
what no remat policy or sharding removes, so a run it refuses cannot fit; one it lets through may still not, which
`check_compiled_fits` finds from the compiled step, before its first run.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

from clip_jax.models.clip import CLIPConfig
from clip_jax.models.resnet import ResNetConfig, block_plan
from clip_jax.models.towers import TowerConfig

GIB = 1024**3


def _tower_parameters(t: TowerConfig) -> int:
    """The weights of a tower's blocks (q/k/v/out projections and the MLP); embeddings and norms left out."""
    return t.layers * (4 * t.width * t.heads * t.head_dim + 2 * t.width * t.mlp_dim)


def _tower_activations(t: TowerConfig, tokens: int, bytes_per_value: int) -> int:
    """The residual stream entering every block, which the backward pass needs under any remat policy."""
    return t.layers * tokens * t.width * bytes_per_value


def _resnet_parameters(v: ResNetConfig) -> int:
    """The convolution kernels of a ResNet tower's blocks and its attention pool's q/k/v projections."""
    return sum(c * p + 9 * p * p + 4 * p * p + (4 * p * c if j == 0 else 0)
               for j, (c, p, _, _) in enumerate(block_plan(v))) + 3 * v.feature_width**2


def _resnet_activations(v: ResNetConfig, bytes_per_value: int) -> int:
    """The feature map entering every block, which the backward pass needs under any remat policy."""
    return sum(side * side * c for c, _, _, side in block_plan(v)) * bytes_per_value


def min_train_bytes_per_device(model: CLIPConfig, batch_size: int, batch_shards: int, param_shards: int,
                               accum_steps: int = 1) -> dict[str, int]:
    """Lower bounds, in bytes per device, of one train step: `params` (parameters, gradients and the two AdamW
    moments, fp32, split over `param_shards`), `activations` (one micro-batch's residual streams of the towers)
    and `images` (its uint8 input). `batch_shards` devices split the batch."""
    v, t = model.vision, model.text
    rows = -(-batch_size // (batch_shards * accum_steps))  # this device's rows of one micro-batch
    bytes_per_value = 2 if model.dtype in ("bfloat16", "float16") else 4
    if isinstance(v, ResNetConfig):
        vision_params, vision_activations = _resnet_parameters(v), _resnet_activations(v, bytes_per_value)
    else:
        vision_tokens = v.kept_patches + 1  # the blocks see the patches that patch dropout keeps
        vision_params = _tower_parameters(v)
        vision_activations = _tower_activations(v, vision_tokens, bytes_per_value)
    params = vision_params + _tower_parameters(t)
    activations = vision_activations + _tower_activations(t, t.context_length, bytes_per_value)
    if (a := model.audio) is not None:  # AudioCLIP's tower: its patches and class token; float32 waveforms
        params += _tower_parameters(a)
        activations += _tower_activations(a, a.grid[0] * a.grid[1] + 1, bytes_per_value) + 4 * a.num_samples
    params = 4 * 4 * params // param_shards
    activations *= rows
    images = rows * v.image_size**2 * 3
    return {"params": params, "activations": activations, "images": images}


def device_memory_bytes() -> int | None:
    """Memory of one local device: the accelerator's limit, or on the CPU the machine's RAM shared by the local
    (possibly fake) devices. None where neither is known."""
    device = jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except (NotImplementedError, RuntimeError):
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
        return ram // jax.local_device_count()
    return None


def check_fits(config: ml_collections.ConfigDict, model: CLIPConfig, batch_shards: int, param_shards: int
               ) -> str | None:
    """A one-line reason why the run cannot fit its devices, or None when the lower bound fits."""
    available = device_memory_bytes()
    if available is None:
        return None
    need = min_train_bytes_per_device(model, config.batch_size, batch_shards, param_shards, config.accum_steps)
    total = sum(need.values())
    if total <= available:
        return None
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in need.items())
    return (
        f"this model and batch need at least {total / GIB:.1f} GiB per device ({parts} GiB) and a device has "
        f"{available / GIB:.1f} GiB: lower batch_size, model.vision.image_size (now {model.vision.image_size}) or "
        "the model's sizes, or raise accum_steps or mesh.fsdp"
    )


def check_compiled_fits(compiled: Any, available: int | None) -> str | None:
    """A one-line reason why the compiled step cannot run on a device of `available` bytes (XLA's own memory analysis
    of it: arguments and outputs, less the donated state they share, and temporaries), or None. `check_fits`'s lower
    bound lets through what only the compiled program shows (a batch whose activations outgrow the device): the run
    then failed at its first step with RESOURCE_EXHAUSTED, an "unexpected error"."""
    try:
        mem = compiled.memory_analysis()
    except (NotImplementedError, AttributeError):  # not every backend reports it
        return None
    if mem is None or available is None:
        return None
    need = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
    if need <= available:
        return None
    temporaries = mem.temp_size_in_bytes / GIB
    return (f"the compiled train step needs {need / GIB:.1f} GiB per device (temporaries {temporaries:.1f} GiB: "
            f"activations and gradients) and a device has {available / GIB:.1f} GiB: lower batch_size or "
            "model.vision.image_size, raise accum_steps or mesh.fsdp, or save activations less (model.remat_policy)")
