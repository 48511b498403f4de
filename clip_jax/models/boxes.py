"""Box geometry for open-vocabulary detection (ViLD, GLIP): conversions, IoU and GIoU, the OWL-ViT box coding
relative to patch anchors, RoIAlign, and non-maximum suppression.

Conventions: boxes are floats in normalised image coordinates, [0, 1] from the image's left (x) and top (y) edge,
as `xyxy` = (x0, y0, x1, y1) or `cxcywh` = (cx, cy, w, h), in the last axis. Everything but the NMS is `jax.numpy`,
jit-able and accepts numpy arrays; the NMS runs on the host (numpy), at evaluation only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The division guard of `giou_loss`: small against the area of any box worth training on (a 1x1-pixel box of a
# 1000-pixel image has area 1e-6), large enough that a zero-area box yields finite values and gradients.
_LOSS_EPS = 1e-7
# `decode_boxes` and `encode_boxes` clip boxes and anchors to [_CLIP, 1 - _CLIP] before their logit, which is
# infinite at 0 and 1 (a box touching the image border).
_CLIP = 1e-4


def cxcywh_to_xyxy(boxes: jax.Array | np.ndarray) -> jax.Array:
    """(cx, cy, w, h) [..., 4] to (x0, y0, x1, y1) [..., 4]."""
    cx, cy, w, h = jnp.moveaxis(jnp.asarray(boxes), -1, 0)
    return jnp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def xyxy_to_cxcywh(boxes: jax.Array | np.ndarray) -> jax.Array:
    """(x0, y0, x1, y1) [..., 4] to (cx, cy, w, h) [..., 4]."""
    x0, y0, x1, y1 = jnp.moveaxis(jnp.asarray(boxes), -1, 0)
    return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_area(boxes: jax.Array | np.ndarray) -> jax.Array:
    """Areas [...] of xyxy boxes [..., 4]."""
    boxes = jnp.asarray(boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _overlap(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(intersection, union, area of the smallest enclosing box) of xyxy boxes broadcast against each other."""
    inter_wh = jnp.clip(jnp.minimum(a[..., 2:], b[..., 2:]) - jnp.maximum(a[..., :2], b[..., :2]), 0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    hull_wh = jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2])
    return inter, union, hull_wh[..., 0] * hull_wh[..., 1]


def _safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, 0 where den is 0; the inner `where` keeps the gradient of the unused branch finite too."""
    positive = den > 0
    return jnp.where(positive, num / jnp.where(positive, den, 1), 0)


def _pairwise(a: jax.Array | np.ndarray, b: jax.Array | np.ndarray) -> tuple[jax.Array, jax.Array, jax.Array]:
    return _overlap(jnp.asarray(a)[:, None, :], jnp.asarray(b)[None, :, :])


def box_iou(a: jax.Array | np.ndarray, b: jax.Array | np.ndarray) -> jax.Array:
    """IoU [N, M] of every xyxy box of `a` [N, 4] with every one of `b` [M, 4]; 0 where the union has no area."""
    inter, union, _ = _pairwise(a, b)
    return _safe_ratio(inter, union)


def generalized_box_iou(a: jax.Array | np.ndarray, b: jax.Array | np.ndarray) -> jax.Array:
    """Generalised IoU [N, M] (IoU minus the fraction of the enclosing box outside the union, in [-1, 1]) of every
    xyxy box of `a` [N, 4] with every one of `b` [M, 4]. Ratios with a zero-area denominator count as 0."""
    inter, union, hull = _pairwise(a, b)
    return _safe_ratio(inter, union) - _safe_ratio(hull - union, hull)


def giou_loss(pred: jax.Array | np.ndarray, target: jax.Array | np.ndarray) -> jax.Array:
    """1 - GIoU [...] of matching xyxy boxes [..., 4], in [0, 2]. The divisions carry a small epsilon rather than
    `box_iou`'s guard, so that a zero-area predicted box still gets a gradient towards its target."""
    inter, union, hull = _overlap(jnp.asarray(pred), jnp.asarray(target))
    return 1 - inter / (union + _LOSS_EPS) + (hull - union) / (hull + _LOSS_EPS)


def patch_anchors(grid: int) -> np.ndarray:
    """cxcywh boxes [grid * grid, 4] (float32, numpy: a constant, which jit embeds) of the patches of a grid x grid
    patch grid, row-major (index row * grid + col): the box of patch (row, col) has centre ((col + 0.5) / grid,
    (row + 0.5) / grid) and size 1 / grid."""
    if grid < 1:
        raise ValueError(f"grid must be positive, got {grid}")
    centres = (np.arange(grid) + 0.5) / grid
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    size = np.full(grid * grid, 1 / grid)
    return np.stack([cx.ravel(), cy.ravel(), size, size], axis=-1).astype(np.float32)


def _logit(p: jax.Array) -> jax.Array:
    p = jnp.clip(p, _CLIP, 1 - _CLIP)
    return jnp.log(p) - jnp.log1p(-p)


def decode_boxes(logits: jax.Array | np.ndarray, anchors: jax.Array | np.ndarray) -> jax.Array:
    """cxcywh boxes [..., P, 4] from box-head outputs [..., P, 4] relative to anchors [P, 4] (cxcywh), as OWL-ViT:
    sigmoid(logits + logit(anchors)), so that zero logits give the anchor and every box stays inside (0, 1)."""
    return jax.nn.sigmoid(jnp.asarray(logits) + _logit(jnp.asarray(anchors)))


def encode_boxes(boxes: jax.Array | np.ndarray, anchors: jax.Array | np.ndarray) -> jax.Array:
    """The inverse of `decode_boxes`: the logits [..., P, 4] that decode to cxcywh `boxes` [..., P, 4] (clipped to
    [1e-4, 1 - 1e-4]) relative to `anchors` [P, 4]."""
    return _logit(jnp.asarray(boxes)) - _logit(jnp.asarray(anchors))


def _interpolation_weights(start: jax.Array, end: jax.Array, size: int, output_size: int, sampling_ratio: int,
                           dtype: jnp.dtype) -> jax.Array:
    """Along one axis of a feature map of `size` cells, the weights [..., output_size, size] whose product with the
    features averages each bin's `sampling_ratio` bilinear samples, for RoIs from `start` to `end` [...] in feature
    coordinates (cell i centred at i). Interpolation as torchvision's: a sample beyond one cell outside the map is 0,
    others are clamped to [0, size - 1]."""
    bin_size = (end - start) / output_size
    offsets = jnp.arange(output_size)[:, None] + (jnp.arange(sampling_ratio)[None, :] + 0.5) / sampling_ratio
    points = start[..., None, None] + offsets * bin_size[..., None, None]  # [..., output_size, sampling_ratio]
    valid = (points >= -1) & (points <= size)
    points = jnp.clip(points, 0, size - 1)
    low = jnp.floor(points)
    frac = points - low
    low = low.astype(jnp.int32)
    high = jnp.minimum(low + 1, size - 1)  # at the last cell, frac is 0: the high neighbour gets no weight
    cells = jnp.arange(size)
    weights = ((1 - frac)[..., None] * (cells == low[..., None]) + frac[..., None] * (cells == high[..., None]))
    weights = jnp.where(valid[..., None], weights, 0)
    return (weights.sum(axis=-2) / sampling_ratio).astype(dtype)


def roi_align(features: jax.Array | np.ndarray, boxes: jax.Array | np.ndarray, output_size: int,
              sampling_ratio: int = 2) -> jax.Array:
    """RoIAlign (Mask R-CNN; torchvision's `roi_align(..., aligned=True)`) of normalised xyxy `boxes` [B, R, 4] on
    `features` [B, H, W, C] that cover the image (cell (i, j) centred at ((j + 0.5) / W, (i + 0.5) / H)):
    [B, R, output_size, output_size, C] in the features' dtype, each bin the mean of sampling_ratio x
    sampling_ratio bilinear samples on a regular sub-grid of the bin.

    Bilinear sampling and its validity are both separable in x and y, so each RoI's result is Wy @ F @ Wx^T with
    interpolation matrices Wy [output_size, H] and Wx [output_size, W]: matrix products instead of gathers, whose
    gradient (a scatter-add) is slow on accelerators. Unlike torchvision, the number of samples is fixed
    (`sampling_ratio` >= 1): an adaptive one would depend on the boxes' values, which jit cannot trace."""
    if output_size < 1 or sampling_ratio < 1:
        raise ValueError(f"output_size and sampling_ratio must be positive, got {output_size} and {sampling_ratio}")
    features, boxes = jnp.asarray(features), jnp.asarray(boxes)
    _, height, width, _ = features.shape
    compute = jnp.promote_types(features.dtype, jnp.float32)  # bilinear weights in bfloat16 would be off by ~0.4%
    boxes = boxes.astype(compute)
    # Normalised to feature coordinates, where cell i is centred at i: (x * W - 0.5), torchvision's aligned=True.
    wx = _interpolation_weights(boxes[..., 0] * width - 0.5, boxes[..., 2] * width - 0.5, width, output_size,
                                sampling_ratio, compute)
    wy = _interpolation_weights(boxes[..., 1] * height - 0.5, boxes[..., 3] * height - 0.5, height, output_size,
                                sampling_ratio, compute)
    highest = jax.lax.Precision.HIGHEST  # a TPU's default bfloat16 passes would round the weights as well
    rows = jnp.einsum("brph,bhwc->brpwc", wy, features.astype(compute), precision=highest)
    return jnp.einsum("brpwc,brqw->brpqc", rows, wx, precision=highest).astype(features.dtype)


def _np_iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box [4] with others [K, 4], as torchvision's NMS computes it; 0 for a zero-area union."""
    wh = np.clip(np.minimum(box[2:], others[:, 2:]) - np.maximum(box[:2], others[:, :2]), 0, None)
    inter = wh[:, 0] * wh[:, 1]
    union = (box[2] - box[0]) * (box[3] - box[1]) + (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = union - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_outputs: int | None = None) -> np.ndarray:
    """Greedy non-maximum suppression of xyxy `boxes` [N, 4] by `scores` [N]: the indices (int64) of the boxes
    kept, by descending score. A box is suppressed when its IoU with a kept higher-scoring box is above
    `iou_threshold` (torchvision's rule). At most `max_outputs` indices if given."""
    boxes, scores = np.asarray(boxes, np.float64), np.asarray(scores)
    order = np.argsort(-scores, kind="stable")
    limit = len(order) if max_outputs is None else max_outputs
    kept: list[int] = []
    while len(order) and len(kept) < limit:
        best, order = order[0], order[1:]
        kept.append(int(best))
        order = order[_np_iou(boxes[best], boxes[order]) <= iou_threshold]
    return np.asarray(kept, np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float,
                max_outputs: int | None = None) -> np.ndarray:
    """`nms` within each class of `classes` [N] independently (a box suppresses only boxes of its own class, as
    torchvision's `batched_nms`): the indices kept, by descending score over all classes, at most `max_outputs`."""
    boxes, scores, classes = np.asarray(boxes, np.float64), np.asarray(scores), np.asarray(classes)
    kept = [np.flatnonzero(classes == c) for c in np.unique(classes)]
    kept = [members[nms(boxes[members], scores[members], iou_threshold, max_outputs)] for members in kept]
    kept = np.concatenate([np.zeros(0, np.int64), *kept])
    return kept[np.argsort(-scores[kept], kind="stable")][:max_outputs]
