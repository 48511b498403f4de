"""Position tables. Of the image towers: a change of resolution (`resize_image_positions`, `clip-jax convert
--image-size`). Of the text tower: Long-CLIP's knowledge-preserving stretching (arXiv 2403.15378), the plain
interpolation baseline, and the two tables of a stretched model (`clip-jax stretch`, in interop/workdir.py, writes
a stretched workdir with them).

Knowledge-preserving stretching keeps the first `keep` positions (well trained on short captions) and spreads
the rest `ratio` times further, interpolating linearly between neighbours and extrapolating past the last one:
77 positions with keep 20, ratio 4 give 20 + 4 * 57 = 248. The stretched model holds the table twice
(`text.keep_positions = keep`): positions below `keep` read `positional_embedding`, which Long-CLIP configs freeze,
the others `positional_embedding_res`, which trains.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.errors import ConfigError
from clip_jax.models.resnet import STRIDE


def stretched_length(length: int, keep: int = 20, ratio: int = 4) -> int:
    return keep + ratio * (length - keep)


def check_stretch(current: int, *, method: str = "keep", keep: int | None = 20, ratio: int | None = 4,
                  length: int | None = None) -> int:
    """The number of positions that stretching a table of `current` positions gives, or a ConfigError naming the
    `clip-jax stretch` flag that cannot: "keep" needs 2 positions past the kept ones to interpolate between, and
    "interpolate" (to `length`) must lengthen the table."""
    if method == "keep":
        if length is not None:
            raise ConfigError(f"--length {length} is for --method interpolate; --method keep makes "
                              "keep + ratio * (length - keep) positions (--keep, --ratio)")
        if not 0 <= keep <= current - 2:
            raise ConfigError(f"--keep {keep}: must be in [0, {current - 2}] for a table of {current} positions "
                              "(at least 2 past the kept ones are stretched)")
        if ratio < 2:
            raise ConfigError(f"--ratio {ratio}: must be >= 2 (1 leaves the positions as they are)")
        return stretched_length(current, keep, ratio)
    if method == "interpolate":
        if keep is not None or ratio is not None:  # the CLI passes None where they were not given
            raise ConfigError("--keep and --ratio are for --method keep; --method interpolate resamples every "
                              "position to --length")
        if length is None:
            raise ConfigError("--method interpolate needs the new length: pass --length L")
        if length <= current:
            raise ConfigError(f"--length {length}: must be more than the {current} positions the model has (a "
                              "stretch lengthens the text context)")
        return length
    raise ConfigError(f"unknown stretch method {method!r}; choose 'keep' or 'interpolate'")


def stretch_positions(table: np.ndarray, keep: int = 20, ratio: int = 4) -> np.ndarray:
    """[L, w] -> [keep + ratio * (L - keep), w]:
    Q[i] = P[i] for i < keep;
    Q[keep + ratio*i + j] = (1 - j/ratio) P[keep + i] + (j/ratio) P[keep + i + 1]  for i < L - keep - 1, j < ratio;
    Q[keep + ratio*(L - keep - 1) + k] = P[L-1] + k (P[L-1] - P[L-2]) / ratio  for k < ratio (extrapolation).
    """
    table = np.asarray(table)
    length = check_stretch(table.shape[0], keep=keep, ratio=ratio)
    t = (np.arange(ratio) / ratio)[None, :, None]  # [1, ratio, 1]
    left, right = table[keep:-1], table[keep + 1 :]  # [L - keep - 1, w] each
    middle = ((1 - t) * left[:, None] + t * right[:, None]).reshape(-1, table.shape[1])
    tail = table[-1] + (np.arange(ratio)[:, None] / ratio) * (table[-1] - table[-2])
    out = np.concatenate([table[:keep], middle, tail]).astype(table.dtype)
    assert out.shape[0] == length
    return out


def interpolate_positions(table: np.ndarray, new_length: int) -> np.ndarray:
    """The baseline: resample all positions linearly to `new_length` (first and last positions kept)."""
    table = np.asarray(table)
    if new_length < 2:
        raise ValueError(f"new_length must be >= 2, got {new_length}")
    x = np.linspace(0, table.shape[0] - 1, new_length)
    lo = np.floor(x).astype(int).clip(0, table.shape[0] - 2)
    frac = (x - lo)[:, None]
    return ((1 - frac) * table[lo] + frac * table[lo + 1]).astype(table.dtype)


def merge_position_tables(kept: jax.Array, rest: jax.Array, keep: int) -> jax.Array:
    """The single table of Long-CLIP's two: rows below `keep` from `kept` (frozen in training), the others from
    `rest`. What the text tower adds to its tokens, and what single-table exports (Hugging Face) hold."""
    return jnp.where(jnp.arange(kept.shape[0])[:, None] < keep, kept, rest)


def stretch_text_positions(params: dict[str, Any], text: dict[str, Any], *, method: str = "keep", keep: int = 20,
                           ratio: int = 4, length: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params, text tower config) with the text positions stretched: method "keep" (`stretch_positions`; two
    tables, both set to the stretched one, keep_positions = keep) or "interpolate" (`interpolate_positions` to
    `length`; one table). A model that already has two tables is stretched from the table it uses."""
    old = params["text"]
    table = np.asarray(old["positional_embedding"])
    if text.get("keep_positions", 0):
        table = np.asarray(merge_position_tables(table, np.asarray(old["positional_embedding_res"]),
                                                 text["keep_positions"]))
    if method == "interpolate":
        keep = ratio = None
    check_stretch(table.shape[0], method=method, keep=keep, ratio=ratio, length=length)
    if method == "keep":
        table = stretch_positions(table, keep, ratio)
    else:
        table, keep = interpolate_positions(table, length), 0
    new = {k: v for k, v in old.items() if k != "positional_embedding_res"}
    new["positional_embedding"] = table
    if keep:
        new["positional_embedding_res"] = table.copy()
    return {**params, "text": new}, {**text, "context_length": int(table.shape[0]), "keep_positions": keep}


def resize_grid_positions(table: np.ndarray, grid: int, leading: int = 1) -> np.ndarray:
    """A position table of `leading` special tokens (ViT's class token, a ResNet attention pool's mean token) then a
    square grid, resized to a `grid` x `grid` grid by bilinear interpolation of the grid part (the special rows
    kept)."""
    table = np.asarray(table)
    old = math.isqrt(table.shape[0] - leading)
    if old * old != table.shape[0] - leading:
        raise ValueError(f"a position table of {table.shape[0]} rows is not {leading} + a square grid")
    spatial = table[leading:].reshape(old, old, -1)
    resized = jax.image.resize(spatial, (grid, grid, spatial.shape[-1]), "bilinear", antialias=False)
    return np.concatenate([table[:leading], np.asarray(resized, table.dtype).reshape(grid * grid, -1)])


def resize_image_positions(params: dict[str, Any], vision: dict[str, Any], image_size: int
                           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params, image tower config) for another image resolution: the grid part of the position table (a ViT's, or
    a ResNet's attention pool's) interpolated to the new grid. A ConfigError names a size the tower cannot take."""
    stride = STRIDE if vision["type"] == "resnet" else vision["patch_size"]
    what = "the resnet's total stride" if vision["type"] == "resnet" else "model.vision.patch_size"
    if image_size < stride or image_size % stride:
        raise ConfigError(f"--image-size {image_size}: must be a positive multiple of {stride} ({what})")
    old = params["visual"]
    if vision["type"] == "resnet":
        pool = dict(old["attnpool"])
        pool["positional_embedding"] = resize_grid_positions(pool["positional_embedding"], image_size // stride)
        new = {**old, "attnpool": pool}
    else:
        new = {**old, "positional_embedding": resize_grid_positions(old["positional_embedding"],
                                                                    image_size // stride)}
    return {**params, "visual": new}, {**vision, "image_size": image_size}
