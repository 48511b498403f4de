"""Tests of `clip_jax.models.boxes`: IoU, GIoU, the box coding and RoIAlign against values worked out by hand, and
RoIAlign and the NMS against torchvision on random inputs.

torchvision's compiled operators do not load here (a CUDA build beside a CPU torch): the comparisons with its C++
RoIAlign and NMS kernels skip without them. RoIAlign is then compared with torchvision's pure-PyTorch
transcription of the kernel, and the NMS with the property that defines greedy NMS, by torchvision's IoU."""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# As in test_interop: the broken build fails registering fake kernels for its operators on import; nothing here
# uses them.
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
from torchvision.extension import _has_ops  # noqa: E402

from clip_jax.models.boxes import (  # noqa: E402
    batched_nms,
    box_area,
    box_iou,
    cxcywh_to_xyxy,
    decode_boxes,
    encode_boxes,
    generalized_box_iou,
    giou_loss,
    nms,
    patch_anchors,
    roi_align,
    xyxy_to_cxcywh,
)

# The tests call the functions jitted: run eagerly, every jnp operation in them compiles on its own, which here takes
# seconds, far longer than one compilation of the whole function.
box_iou, generalized_box_iou, giou_loss = jax.jit(box_iou), jax.jit(generalized_box_iou), jax.jit(giou_loss)
decode_boxes, encode_boxes = jax.jit(decode_boxes), jax.jit(encode_boxes)
roi_align = jax.jit(roi_align, static_argnums=(2, 3))


def test_iou_and_giou_by_hand():
    a = np.array([[0.0, 0.0, 2.0, 2.0]])
    b = np.array([[1.0, 1.0, 3.0, 3.0], [3.0, 0.0, 4.0, 1.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    # vs b0: intersection [1,2]x[1,2] = 1, union 4 + 4 - 1 = 7: IoU 1/7; enclosing [0,3]x[0,3] = 9: GIoU 1/7 - 2/9.
    # vs b1 (disjoint): IoU 0; enclosing [0,4]x[0,2] = 8, union 4 + 1 = 5: GIoU 0 - 3/8.
    # vs b2 (itself): 1 and 1. vs b3 (a point): union 4, IoU 0; enclosing [0,5]x[0,5] = 25: GIoU -21/25.
    np.testing.assert_allclose(box_iou(a, b), [[1 / 7, 0, 1, 0]], rtol=1e-6)
    np.testing.assert_allclose(generalized_box_iou(a, b), [[1 / 7 - 2 / 9, -3 / 8, 1, -21 / 25]], rtol=1e-6)
    np.testing.assert_allclose(box_area(b), [4, 1, 4, 0])
    assert box_iou(a, b).shape == (1, 4) and generalized_box_iou(b, a).shape == (4, 1)


def test_zero_area_union_gives_zero_not_nan():
    point = np.array([[0.5, 0.5, 0.5, 0.5]])
    assert float(box_iou(point, point)[0, 0]) == 0.0
    assert float(generalized_box_iou(point, point)[0, 0]) == 0.0


def test_giou_loss():
    boxes = jnp.array([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]])
    np.testing.assert_allclose(giou_loss(boxes, boxes), [0, 0], atol=1e-5)
    # 1 - GIoU of the disjoint pair above, scaled by 1/4 (GIoU is scale-invariant): 1 + 3/8.
    loss = giou_loss(jnp.array([0.0, 0.0, 0.5, 0.5]), jnp.array([0.75, 0.0, 1.0, 0.25]))
    np.testing.assert_allclose(loss, 1 + 3 / 8, rtol=1e-5)
    # A degenerate (zero-area) prediction, on its target and elsewhere: finite loss and gradient.
    point, target = jnp.array([0.3, 0.3, 0.3, 0.3]), jnp.array([0.2, 0.2, 0.6, 0.6])
    for other in (point, target):
        value, grad = jax.jit(jax.value_and_grad(giou_loss))(point, other)
        assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_conversions_round_trip():
    xyxy = np.array([[0.1, 0.2, 0.4, 0.8], [0.0, 0.0, 1.0, 1.0]], np.float32)
    cxcywh = xyxy_to_cxcywh(xyxy)
    np.testing.assert_allclose(cxcywh, [[0.25, 0.5, 0.3, 0.6], [0.5, 0.5, 1, 1]], rtol=1e-6)
    np.testing.assert_allclose(cxcywh_to_xyxy(cxcywh), xyxy, rtol=1e-6)
    assert jax.jit(cxcywh_to_xyxy)(cxcywh[None]).shape == (1, 2, 4)


def test_patch_anchors_and_coding():
    # Grid 2, row-major: (row 0, col 0), (0, 1), (1, 0), (1, 1); centres at 1/4 and 3/4, sides 1/2.
    np.testing.assert_allclose(patch_anchors(2), [[0.25, 0.25, 0.5, 0.5], [0.75, 0.25, 0.5, 0.5],
                                                  [0.25, 0.75, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]])
    anchors = patch_anchors(2)
    np.testing.assert_allclose(decode_boxes(jnp.zeros((3, 4, 4)), anchors), jnp.broadcast_to(anchors, (3, 4, 4)),
                               rtol=1e-5)
    boxes = np.random.default_rng(0).uniform(0.05, 0.95, (2, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(decode_boxes(encode_boxes(boxes, anchors), anchors), boxes, rtol=1e-5)


def test_roi_align_is_exact_on_linear_and_constant_maps():
    height, width = 4, 6
    # f = 2x + 3y + 1 in normalised coordinates, sampled at the cell centres ((j + 0.5) / W, (i + 0.5) / H).
    ys, xs = np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij")
    linear = (2 * xs + 3 * ys + 1)[None, :, :, None]
    constant = np.full((1, height, width, 2), 7.0)
    # A box well inside the samples' clamping range: x in [0.25, 0.75], y in [0.3, 0.7]. Its 2x2 bins are
    # [0.25, 0.5] and [0.5, 0.75] in x, [0.3, 0.5] and [0.5, 0.7] in y, centred at x 0.375, 0.625 and y 0.4, 0.6:
    # the mean of bilinear samples of a linear map is its value at the samples' mean, the bin centre.
    box = np.array([[[0.25, 0.3, 0.75, 0.7]]])
    centres_y, centres_x = np.array([0.4, 0.6]), np.array([0.375, 0.625])
    expected = 2 * centres_x[None, :] + 3 * centres_y[:, None] + 1
    np.testing.assert_allclose(roi_align(linear, box, 2)[0, 0, :, :, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(roi_align(constant, box, 3), np.full((1, 1, 3, 3, 2), 7.0), rtol=1e-6)


def random_rois(rng: np.random.Generator, batch: int, rois: int, low: float, high: float) -> np.ndarray:
    """Normalised xyxy boxes [batch, rois, 4] with corners uniform in [low, high], the first of each image tiny."""
    corners = rng.uniform(low, high, (batch, rois, 2, 2))
    boxes = np.concatenate([corners.min(axis=2), corners.max(axis=2)], axis=-1).astype(np.float32)
    boxes[:, 0, 2:] = boxes[:, 0, :2] + 0.01
    return boxes


def torchvision_roi_align(roi_align_fn, features: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """`roi_align_fn` (torchvision's signature) on our layouts: NCHW features, and rois [K, 5] = (batch index, x0, y0,
    x1, y1) in input pixels, which it multiplies by spatial_scale. With H != W no single spatial_scale maps
    normalised boxes to feature cells, so the boxes go in feature pixels (x * W, y * H) with spatial_scale 1;
    aligned=True then subtracts the same half cell as `roi_align`."""
    batch, height, width, channels = features.shape
    rois = boxes.shape[1]
    pixels = boxes * np.array([width, height, width, height], np.float32)
    rois_tv = np.concatenate([np.repeat(np.arange(batch), rois)[:, None], pixels.reshape(-1, 4)], axis=1)
    out = roi_align_fn(torch.from_numpy(features.transpose(0, 3, 1, 2)), torch.from_numpy(rois_tv.astype(np.float32)),
                       spatial_scale=1.0, sampling_ratio=2, aligned=True, **size)
    return out.numpy().reshape(batch, rois, channels, *out.shape[-2:]).transpose(0, 1, 3, 4, 2)


def test_roi_align_matches_torchvision_transcription():
    # torchvision's pure-PyTorch RoIAlign, unwrapped from the torch.compile its first call would run (most of a
    # minute here). It clamps every sample into the map instead of zeroing those more than a cell outside, so the
    # boxes stay within 0.05 of the image, where no sample is (the zeroing has its own test below).
    module = sys.modules["torchvision.ops.roi_align"]
    transcription = getattr(module._roi_align, "__wrapped__", None)
    if transcription is None:
        pytest.skip("this torchvision has no uncompiled pure-PyTorch roi_align")
    rng = np.random.default_rng(1)
    features = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
    boxes = random_rois(rng, 2, 6, -0.05, 1.05)
    ours = roi_align(features, boxes, 3, 2)
    theirs = torchvision_roi_align(transcription, features, boxes, {"pooled_height": 3, "pooled_width": 3})
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.skipif(not _has_ops(), reason="torchvision's compiled operators do not load")
def test_roi_align_matches_torchvision_kernel():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
    boxes = random_rois(rng, 2, 8, -0.5, 1.5)  # some samples beyond the map: zero
    theirs = torchvision_roi_align(torchvision.ops.roi_align, features, boxes, {"output_size": 3})
    np.testing.assert_allclose(roi_align(features, boxes, 3), theirs, atol=1e-5)


def test_roi_align_zeroes_samples_beyond_the_map():
    features = np.full((1, 4, 4, 1), 5.0, np.float32)
    # In feature coordinates (x * 4 - 0.5) the box x in [1.25, 1.75] spans [4.5, 6.5]: 2 bins, samples at 5 and 6
    # in the first (beyond x = W = 4: 0), while x in [1.0, 1.1] spans [3.5, 3.9], within a cell of the last
    # centre (3): clamped there, the constant. In y both span the map.
    boxes = np.array([[[1.25, 0.0, 1.75, 1.0], [1.0, 0.0, 1.1, 1.0]]], np.float32)
    out = roi_align(features, boxes, 2)
    np.testing.assert_allclose(out[0, 0], 0)
    np.testing.assert_allclose(out[0, 1], 5, rtol=1e-6)


def test_roi_align_gradient_and_dtype():
    features = jnp.ones((1, 4, 4, 2), jnp.bfloat16)
    boxes = jnp.array([[[0.0, 0.0, 0.5, 0.5]]])
    assert roi_align(features, boxes, 2).dtype == jnp.bfloat16
    grad = jax.jit(jax.grad(lambda f: roi_align(f, boxes, 2).sum()))(features.astype(jnp.float32))
    # Each of the 4 bins averages to 1 of total weight, spread over the cells near the box's top-left quarter.
    assert np.isclose(float(grad.sum()), 4 * 2) and float(grad[0, 3, 3].sum()) == 0.0


def test_nms_by_hand():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30]], np.float32)
    scores = np.array([0.8, 0.9, 0.5])
    # Box 1 leads (0.9); box 0 overlaps it by 9x10 = 90 of a 110 union: IoU 0.82 > 0.5, suppressed; box 2 is apart.
    np.testing.assert_array_equal(nms(boxes, scores, 0.5), [1, 2])
    np.testing.assert_array_equal(nms(boxes, scores, 0.9), [1, 0, 2])
    np.testing.assert_array_equal(nms(boxes, scores, 0.9, max_outputs=2), [1, 0])
    # In different classes, boxes 0 and 1 do not suppress each other.
    np.testing.assert_array_equal(batched_nms(boxes, scores, np.array([0, 1, 0]), 0.5), [1, 0, 2])
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).shape == (0,)


def random_nms_inputs(n: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    corners = rng.uniform(0, 1, (n, 2, 2))
    boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=-1).astype(np.float32)
    scores = rng.permutation(n).astype(np.float32) / n  # distinct: no tie for two sorts to break apart
    return boxes, scores, rng.integers(0, 4, n)


@pytest.mark.parametrize("threshold", [0.3, 0.7])
def test_nms_is_greedy_nms(threshold):
    """Kept boxes overlap no kept box (of their class) above the threshold, and every dropped box overlaps a kept
    box of higher score above it: with distinct scores, only greedy NMS's result has both properties (by induction
    down the scores, each box's fate is then forced)."""
    boxes, scores, classes = random_nms_inputs()
    iou = torchvision.ops.box_iou(torch.from_numpy(boxes), torch.from_numpy(boxes)).numpy()
    higher = scores[None, :] > scores[:, None]  # [i, j]: j scores above i
    for same_class, keep in ((np.ones_like(iou, bool), nms(boxes, scores, threshold)),
                             (classes[:, None] == classes[None, :], batched_nms(boxes, scores, classes, threshold))):
        assert np.all(np.diff(scores[keep]) < 0)
        kept = np.isin(np.arange(len(boxes)), keep)
        overlaps = (iou > threshold) & same_class & kept[None, :] & higher
        assert not overlaps[kept].any()
        assert overlaps[~kept].any(axis=1).all()
    top = batched_nms(boxes, scores, classes, threshold)
    np.testing.assert_array_equal(batched_nms(boxes, scores, classes, threshold, max_outputs=5), top[:5])


@pytest.mark.skipif(not _has_ops(), reason="torchvision's compiled operators do not load")
@pytest.mark.parametrize("threshold", [0.3, 0.7])
def test_nms_matches_torchvision(threshold):
    boxes, scores, classes = random_nms_inputs()
    tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
    np.testing.assert_array_equal(nms(boxes, scores, threshold), torchvision.ops.nms(tb, ts, threshold).numpy())
    expected = torchvision.ops.batched_nms(tb, ts, torch.from_numpy(classes), threshold).numpy()
    np.testing.assert_array_equal(batched_nms(boxes, scores, classes, threshold), expected)


@pytest.mark.parametrize("grid", [0, -1])
def test_patch_anchors_refuses_empty_grid(grid):
    with pytest.raises(ValueError, match="grid"):
        patch_anchors(grid)
