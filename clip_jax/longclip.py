"""Long-CLIP's positional-embedding stretching (arXiv 2403.15378), the plain interpolation baseline, the two
position tables of a stretched model, and `clip-jax stretch`.

Knowledge-preserving stretching keeps the first `keep` positions (well trained on short captions) and spreads
the rest `ratio` times further, interpolating linearly between neighbours and extrapolating past the last one:
77 positions with keep 20, ratio 4 give 20 + 4 * 57 = 248. The stretched model holds the table twice
(`text.keep_positions = keep`): positions below `keep` read `positional_embedding`, which Long-CLIP configs freeze,
the others `positional_embedding_res`, which trains.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)


def stretched_length(length: int, keep: int = 20, ratio: int = 4) -> int:
    return keep + ratio * (length - keep)


def stretch_positions(table: np.ndarray, keep: int = 20, ratio: int = 4) -> np.ndarray:
    """[L, w] -> [keep + ratio * (L - keep), w]:
    Q[i] = P[i] for i < keep;
    Q[keep + ratio*i + j] = (1 - j/ratio) P[keep + i] + (j/ratio) P[keep + i + 1]  for i < L - keep - 1, j < ratio;
    Q[keep + ratio*(L - keep - 1) + k] = P[L-1] + k (P[L-1] - P[L-2]) / ratio  for k < ratio (extrapolation).
    """
    table = np.asarray(table)
    length = table.shape[0]
    if not 0 <= keep <= length - 2:
        raise ValueError(f"keep must be in [0, {length - 2}] for a table of {length} positions, got {keep}")
    if ratio < 1:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    t = (np.arange(ratio) / ratio)[None, :, None]  # [1, ratio, 1]
    left, right = table[keep:-1], table[keep + 1 :]  # [L - keep - 1, w] each
    middle = ((1 - t) * left[:, None] + t * right[:, None]).reshape(-1, table.shape[1])
    tail = table[-1] + (np.arange(ratio)[:, None] / ratio) * (table[-1] - table[-2])
    out = np.concatenate([table[:keep], middle, tail]).astype(table.dtype)
    assert out.shape[0] == stretched_length(length, keep, ratio)
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


def first_sentence(caption: str) -> str:
    """Long-CLIP's short caption of a long one: the text before the first ". " (the reference's split)."""
    return caption.split(". ")[0]


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
    if method == "keep":
        table = stretch_positions(table, keep, ratio)
    elif method == "interpolate":
        if length is None:
            raise ValueError("method 'interpolate' needs the new length")
        table, keep = interpolate_positions(table, length), 0
    else:
        raise ValueError(f"unknown stretch method {method!r}; choose 'keep' or 'interpolate'")
    new = {k: v for k, v in old.items() if k != "positional_embedding_res"}
    new["positional_embedding"] = table
    if keep:
        new["positional_embedding_res"] = table.copy()
    return {**params, "text": new}, {**text, "context_length": int(table.shape[0]), "keep_positions": keep}


def stretch_workdir(src: str | pathlib.Path, out: str | pathlib.Path, *, method: str = "keep", keep: int = 20,
                    ratio: int = 4, length: int | None = None) -> dict[str, Any]:
    """`clip-jax stretch`: a new workdir `out` whose step-0 checkpoint (a warm start for `train`) is the latest
    checkpoint of `src` with its text positions stretched, config.json the source's with the new context length
    and keep_positions, and the same tokenizer. Returns {"context_length", "keep_positions"}."""
    import ml_collections

    from clip_jax.interop.workdir import write_workdir
    from clip_jax.train.loop import load_trained

    config, _, params, tokenizer, _, step = load_trained(src)
    params = jax.tree.map(np.asarray, jax.device_get(params))
    params, text = stretch_text_positions(params, config.model.text.to_dict(), method=method, keep=keep,
                                          ratio=ratio, length=length)
    config.model.text = ml_collections.ConfigDict(text)
    write_workdir(config, params, tokenizer, out)
    log.info("stretched %s (step %d) to %d text positions (keep %d) into %s", src, step, text["context_length"],
             text["keep_positions"], out)
    return {"context_length": text["context_length"], "keep_positions": text["keep_positions"]}
