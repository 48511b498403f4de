"""Long-CLIP's positional-embedding stretching (arXiv 2403.15378) and the plain interpolation baseline.

Knowledge-preserving stretching keeps the first `keep` positions (well trained on short captions) and spreads
the rest `ratio` times further, interpolating linearly between neighbours and extrapolating past the last one:
77 positions with keep 20, ratio 4 give 20 + 4 * 57 = 248.
"""

from __future__ import annotations

import numpy as np


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
