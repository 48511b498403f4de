"""The open-vocabulary detection code (ViLD, GLIP) against hand-computed values, numpy loops and invariants: the
per-example targets and regions (data/detection.py), scene boxes, grounding prompts and their chunks, the focal and
detection losses (one device and a 4x2 mesh), the detectors' heads and `detect` functions recomputed in numpy from
the models' own parts, ViLD's base mask and its training step's masked logits, and the detection evaluation.

Models are tiny (width 32, one layer, 32 px images, 16 px patches: a 2 x 2 grid) and, but for the box head's
initial state, their parameters are random values of the shapes `init` gives (no initialiser is compiled); the
functions of a test are compiled together, once."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax import losses
from clip_jax.config import load_config
from clip_jax.data.detection import (
    DetectionSet,
    crop_regions,
    grounding_prompt,
    patch_targets,
    prompt_chunks,
    region_crop_embeddings,
    sample_regions,
    shapes_detection_set,
)
from clip_jax.data.pipeline import tokenizer_corpus
from clip_jax.data.shapes import (
    BACKGROUNDS,
    DEFAULT_HELD_OUT,
    Scene,
    ShapeObject,
    class_index,
    class_names,
    object_geometry,
    render_scene,
    scene_boxes,
    scene_masks,
)
from clip_jax.data.tokenizer import ClipTokenizer
from clip_jax.errors import ConfigError
from clip_jax.evaluate.detection import Detections, clip_on_crops, detection_ap, top_detections
from clip_jax.methods import get_method
from clip_jax.methods.base import Preparation
from clip_jax.models.detection import GLIPCLIP, BoxHead, Fusion, ViLDCLIP
from clip_jax.sharding import batch_sharding, make_mesh

TINY = ["--config.model.vision.width=32", "--config.model.vision.layers=1", "--config.model.vision.heads=2",
        "--config.model.vision.head_dim=16", "--config.model.vision.mlp_dim=64", "--config.model.vision.patch_size=16",
        "--config.model.vision.image_size=32", "--config.model.text.width=32", "--config.model.text.layers=1",
        "--config.model.text.heads=2", "--config.model.text.head_dim=16", "--config.model.text.mlp_dim=64",
        "--config.model.embed_dim=16", "--config.data.tokenizer_vocab_size=600", "--config.method.train_examples=8",
        "--config.method.box_width=16", "--config.init_from=x"]
# Scenes of 3 objects (not 3-6): one shape of the regions x objects IoU, compiled once.
VILD = TINY + ["--config.method.regions=4", "--config.method.region_width=16", "--config.data.max_objects=3"]
CONTEXT = 24  # configs/common.py::dense_shapes's text context
HELD_OUT_NAMES = {f"{c} {s}" for c, s in DEFAULT_HELD_OUT}


@pytest.fixture(scope="module")
def vild_config():
    return load_config("configs/vild_shapes.py", VILD)


@pytest.fixture(scope="module")
def tokenizer(vild_config):
    return ClipTokenizer.train(tokenizer_corpus(vild_config, 300), 600)


def random_params(module, *args, method=None, seed=0, std=0.2):
    """Random normal values of the shapes of `module.init(...)`'s parameters: the tests compare functions of the
    parameters with numpy recomputations, which holds for any values (and random ones make no term trivial)."""
    shapes = jax.eval_shape(functools.partial(module.init, method=method), jax.random.PRNGKey(0), *args)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (rng.normal(size=s.shape) * std).astype(s.dtype), nn.meta.unbox(shapes))


def np_iou(a, b):
    """IoU of two xyxy boxes, by hand."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def np_giou_loss(a, b):
    """1 - GIoU of two xyxy boxes, by hand: GIoU = IoU - (C - U) / C, C the enclosing box's area."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    enclosing = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return 1.0 - (w * h / union - (enclosing - union) / enclosing)


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def colour_encoder(dim=16, seed=0):
    """A stand-in image encoder (uint8 [M, S, S, 3] -> normalised [M, dim]): the crop's mean colour and a constant,
    through a fixed random projection. Records the batch sizes it is called with."""
    proj = np.random.default_rng(seed).normal(size=(4, dim))

    def encode(images):
        encode.calls.append(len(images))
        mean = np.asarray(images, np.float64).mean(axis=(1, 2)) / 255.0
        x = np.concatenate([mean, np.ones((len(images), 1))], axis=1) @ proj
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    encode.calls = []
    return encode


# --- targets and regions -------------------------------------------------------------------------------------------
def test_patch_targets_assign_each_centre_patch_and_the_smaller_box_wins_a_shared_one():
    # grid 4: a centre (cx, cy) falls in column floor(4 cx), row floor(4 cy), patch row * 4 + col.
    big = [0.0, 0.0, 0.5, 0.5]  # centre (0.25, 0.25): patch 1 * 4 + 1 = 5
    small = [0.2, 0.2, 0.3, 0.3]  # same centre, smaller: takes patch 5 whatever the order
    right = [0.6, 0.1, 1.0, 0.3]  # centre (0.8, 0.2): patch 0 * 4 + 3 = 3
    corner = [0.9, 0.9, 1.0, 1.0]  # centre (0.95, 0.95): patch 15
    for order in ([0, 1, 2, 3], [1, 0, 3, 2]):
        boxes = np.array([big, small, right, corner], np.float32)[order]
        classes = np.array([7, 8, 9, 10], np.int32)[order]
        patch_boxes, patch_classes = patch_targets(boxes, classes, 4)
        want = np.full(16, -1)
        want[[5, 3, 15]] = [8, 9, 10]
        np.testing.assert_array_equal(patch_classes, want)
        np.testing.assert_allclose(patch_boxes[[5, 3, 15]], [small, right, corner])
        assert not patch_boxes[want < 0].any()  # zeros where no object


def test_sample_regions_labels_match_a_numpy_iou_loop_and_regions_follow_their_recipe():
    boxes = np.array([[0.05, 0.05, 0.35, 0.4], [0.55, 0.5, 0.95, 0.9], [0.6, 0.05, 0.8, 0.25]], np.float32)
    classes = np.array([3, 11, 20], np.int32)
    regions, _ = sample_regions(boxes, classes, np.random.default_rng(0), 4, foreground=0.5)
    again, _ = sample_regions(boxes, classes, np.random.default_rng(0), 4, foreground=0.5)
    np.testing.assert_array_equal(regions, again)  # reproducible from the generator
    for seed in range(5):  # 4 regions a draw (the shapes of the ViLD test's draws: one compile of box_iou)
        regions, labels = sample_regions(boxes, classes, np.random.default_rng(seed), 4, foreground=0.5)
        assert regions.shape == (4, 4) and regions.dtype == np.float32 and labels.dtype == np.int32
        ious = np.array([[np_iou(r, b) for b in boxes] for r in regions])
        # Label: the class of the best-overlapping object when its IoU is >= 0.5, else -1.
        want = np.where(ious.max(1) >= 0.5, classes[ious.argmax(1)], -1)
        np.testing.assert_array_equal(labels, want)
        # round(4 * 0.5) = 2 jittered regions: IoU with some object in [0.5, 0.95] (or 1: the object itself, the
        # fallback when no jitter lands in range); the other 2 random, sides 5-60% of the image, inside it.
        best = ious[:2].max(1)
        assert np.all(((best >= 0.5 - 1e-5) & (best <= 0.95 + 1e-5)) | np.isclose(best, 1.0)), best
        assert np.all(labels[:2] >= 0)
        sides = regions[2:, 2:] - regions[2:, :2]
        assert np.all((sides >= 0.05 - 1e-6) & (sides <= 0.6 + 1e-6)) and regions.min() >= 0 and regions.max() <= 1
    # No objects: every region random and background.
    regions, labels = sample_regions(np.zeros((0, 4), np.float32), np.zeros(0, np.int32), np.random.default_rng(1), 5)
    assert regions.shape == (5, 4) and np.all(labels == -1)


def test_crop_regions_cut_the_box_about_its_centre_at_each_scale():
    # Left half (columns 0-15) blue, right half red, 32 x 32.
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :16] = (0, 0, 255)
    image[:, 16:] = (255, 0, 0)
    boxes = np.array([[0.5, 0.0, 1.0, 1.0],  # the red half
                      [0.0, 0.0, 1.0, 1.0],  # the whole image: at 1.5x, clipped back to the whole image
                      [0.5, 0.5, 0.5, 0.5]], np.float32)  # degenerate: still one pixel's image
    crops = crop_regions(image, boxes, 8, scales=(1.0, 1.5))
    assert crops.shape == (3, 2, 8, 8, 3) and crops.dtype == np.uint8
    # 1x of the red half: the crop's right part (away from the blue edge the bicubic filter reaches) is pure red.
    np.testing.assert_array_equal(crops[0, 0, :, 4:], np.broadcast_to([255, 0, 0], (8, 4, 3)))
    # 1.5x of it: centre x 0.75, width 0.75 -> [0.375, 1.125] cut to [0.375, 1]: columns 12-15 of 20 are blue, so
    # the crop's first column is mostly blue and its last red.
    assert crops[0, 1, :, 0, 2].min() > 128 and crops[0, 1, :, 0, 0].max() < 128
    np.testing.assert_array_equal(crops[0, 1, :, -1], np.broadcast_to([255, 0, 0], (8, 3)))
    np.testing.assert_array_equal(crops[1, 0], crops[1, 1])  # 1.5x of the whole image is cut to the whole image
    assert crops[1, 0, :, 0, 2].min() > 128 and crops[1, 0, :, -1, 0].min() > 128  # blue left, red right
    # A uniform image: every crop is that colour exactly (bicubic weights sum to one).
    flat = np.full((32, 32, 3), (10, 200, 90), np.uint8)
    np.testing.assert_array_equal(crop_regions(flat, boxes, 8), np.broadcast_to([10, 200, 90], (3, 2, 8, 8, 3)))


def test_region_crop_embeddings_average_the_scales_and_batch_by_images_per_call():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), np.uint8)
    boxes = np.array([[[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.8]]] * 3, np.float32) + rng.uniform(0, 0.1, (3, 2, 4))
    encode = colour_encoder()
    got = region_crop_embeddings(encode, images, boxes, 8, images_per_call=2)
    assert encode.calls == [2 * 2 * 2, 1 * 2 * 2]  # images x regions x scales per call
    # By hand: each crop's embedding, the two scales' mean, renormalised.
    for n in range(3):
        crops = crop_regions(images[n], boxes[n], 8, (1.0, 1.5))
        for r in range(2):
            mean = encode(crops[r]).mean(axis=0)
            np.testing.assert_allclose(got[n, r], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(region_crop_embeddings(encode, images, boxes, 8), got, rtol=1e-6)


# --- shapes boxes and detection sets -------------------------------------------------------------------------------
def test_scene_boxes_are_the_tight_extent_of_each_painted_object():
    scene = Scene(background=BACKGROUNDS[0], objects=(
        ShapeObject("red", "circle", "large", cell=4), ShapeObject("blue", "star", "small", cell=0, jitter=(0.5, -1)),
        ShapeObject("green", "triangle", "medium", cell=8, outline=True)))
    boxes, classes = scene_boxes(scene, 64)
    assert boxes.dtype == np.float32 and classes.dtype == np.int32
    np.testing.assert_array_equal(classes, [class_index("red", "circle"), class_index("blue", "star"),
                                            class_index("green", "triangle")])
    _, instances = scene_masks(scene, 64)
    image = render_scene(scene, 64)
    outside = np.ones((64, 64), bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        mask = instances == i + 1
        # Tight: every pixel of the object inside, and each of the four edge lines touches it.
        assert mask[y0:y1, x0:x1].sum() == mask.sum() > 0
        assert mask[y0].any() and mask[y1 - 1].any() and mask[:, x0].any() and mask[:, x1 - 1].any()
        cx, cy, _ = object_geometry(scene.objects[i], 64)
        assert x0 <= cx <= x1 and y0 <= cy <= y1
        outside[y0:y1, x0:x1] = False
    # Independent of the masks: outside every box the clean render is the plain background.
    background = image[outside]
    assert (background == background[0]).all() and not (image[~outside] == background[0]).all(-1).all()


def test_shapes_detection_sets_hold_seen_pairs_in_train_and_a_held_out_pair_in_every_test_novel_scene(vild_config):
    novel = {class_names().index(n) for n in HELD_OUT_NAMES}
    for split, objects in (("train", (2, 3)), ("test_novel", (3, 6))):
        data = shapes_detection_set(vild_config, split, 6, objects)
        assert len(data) == 6 and data.images.shape == (6, 32, 32, 3) and data.names == class_names()
        for boxes, classes in zip(data.boxes, data.classes, strict=True):
            assert objects[0] <= len(boxes) == len(classes) <= objects[1]
            assert np.all((boxes >= 0) & (boxes <= 1)) and np.all(boxes[:, 2:] > boxes[:, :2])
            held = novel & set(classes.tolist())
            assert (not held) if split == "train" else held


def test_ground_truth_is_in_model_pixels_with_one_based_ids():
    data = DetectionSet(np.zeros((2, 32, 32, 3), np.uint8),
                        [np.array([[0.25, 0.5, 0.75, 1.0]], np.float32), np.zeros((0, 4), np.float32)],
                        [np.array([2], np.int32), np.zeros(0, np.int32)], ["a", "b", "c"])
    truth = data.ground_truth()
    # [0.25, 0.5, 0.75, 1.0] x 32 px = x 8, y 16, width 16, height 16; class 2 -> category 3; image 0 -> id 1.
    assert truth["annotations"] == [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [8.0, 16.0, 16.0, 16.0],
                                     "area": 256.0, "iscrowd": 0}]
    assert [im["id"] for im in truth["images"]] == [1, 2] and truth["images"][0]["width"] == 32
    assert truth["categories"] == [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]


# --- grounding prompts ---------------------------------------------------------------------------------------------
def test_grounding_prompt_tokens_and_phrase_ends(tokenizer):
    phrases = ["red star", "blue circle", "white square"]
    text = "red star. blue circle. white square."
    ids, ends = grounding_prompt(tokenizer, phrases, 40)
    np.testing.assert_array_equal(ids, tokenizer([text], 40)[0])
    dot = tokenizer.encode(".")
    assert len(dot) == 1
    for k, phrase in enumerate(phrases):
        own = tokenizer.encode(phrase)
        # The phrase's own ids end at ends[k], and its "." follows.
        np.testing.assert_array_equal(ids[ends[k] - len(own) + 1: ends[k] + 1], own)
        assert ids[ends[k] + 1] == dot[0]
    # Fits: at most context - 2 ids (SOT and EOT take the rest).
    n = len(tokenizer.encode(text))
    grounding_prompt(tokenizer, phrases, n + 2)
    with pytest.raises(ValueError, match="tokens"):
        grounding_prompt(tokenizer, phrases, n + 1)


def test_prompt_chunks_cover_every_class_once_in_order_and_are_packed_greedily(tokenizer):
    names = class_names()
    tokens, ends, classes = prompt_chunks(tokenizer, names, CONTEXT)
    assert tokens.shape[0] == ends.shape[0] == classes.shape[0] and ends.shape == classes.shape
    np.testing.assert_array_equal(classes[classes >= 0], np.arange(len(names)))  # each once, in order
    chunks = [[int(c) for c in row if c >= 0] for row in classes]
    for p, chunk in enumerate(chunks):
        assert np.all(classes[p, len(chunk):] == -1) and np.all(ends[p, len(chunk):] == 0)  # padding
        text = ". ".join(names[c] for c in chunk) + "."
        assert tokenizer.tokenize_with_lengths([text], CONTEXT)[1][0] <= CONTEXT - 2  # fits untruncated
        np.testing.assert_array_equal(tokens[p], tokenizer([text], CONTEXT)[0])
        for k, c in enumerate(chunk):
            assert tokens[p, ends[p, k]] == tokenizer.encode(names[c])[-1]
        if p + 1 < len(chunks):  # greedy: the next chunk's first name would not have fitted in this one
            longer = ". ".join(names[c] for c in chunk + [chunks[p + 1][0]]) + "."
            assert tokenizer.tokenize_with_lengths([longer], CONTEXT)[1][0] > CONTEXT - 2
    # A name too long for the context alone: "red star." is more than 6 - 2 ids.
    assert len(tokenizer.encode("red star.")) > 4
    with pytest.raises(ConfigError, match="red star"):
        prompt_chunks(tokenizer, ["red star"], 6)


# --- losses ----------------------------------------------------------------------------------------------------------
def test_sigmoid_focal_loss_by_hand():
    focal_loss = jax.jit(losses.sigmoid_focal_loss, static_argnums=(2, 3))
    # logit 0, target 1: p = 0.5, CE = log 2, (1 - p_t)^2 = 1/4, alpha 0.25 -> log(2) / 16; target 0: 0.75 log(2) / 4.
    got = focal_loss(jnp.zeros(2), jnp.array([1.0, 0.0]), 0.25, 2.0)
    np.testing.assert_allclose(got, [math.log(2) / 16, 0.75 * math.log(2) / 4], rtol=1e-6)
    x = np.random.default_rng(0).normal(size=(5, 7)) * 4
    t = np.random.default_rng(1).random((5, 7)) < 0.3
    p = sigmoid(x)
    ce = -np.where(t, np.log(p), np.log(1 - p))
    p_t = np.where(t, p, 1 - p)
    np.testing.assert_allclose(focal_loss(x, t, 0.4, 1.5),
                               ce * (1 - p_t) ** 1.5 * np.where(t, 0.4, 0.6), rtol=1e-4, atol=1e-7)
    # alpha < 0: no weighting; gamma 0 as well: plain binary cross-entropy.
    np.testing.assert_allclose(focal_loss(x, t, -1.0, 0.0), ce, rtol=1e-4, atol=1e-7)


def np_detection_loss(o, l1_weight=5.0, giou_weight=2.0, alpha=0.25, gamma=2.0):
    """detection_loss as loops: focal over valid entries, L1 and 1 - GIoU over assigned patches, all / #assigned."""
    b_, p_, k_ = o["patch_logits"].shape
    count = max(o["assigned"].sum(), 1)
    focal = l1 = giou = 0.0
    for b, p in np.ndindex(b_, p_):
        for k in range(k_):
            if o["patch_valid"][b, p, k]:
                q, t = sigmoid(o["patch_logits"][b, p, k]), o["patch_targets"][b, p, k]
                p_t = q if t else 1 - q
                focal += -np.log(p_t) * (1 - p_t) ** gamma * (alpha if t else 1 - alpha)
        if o["assigned"][b, p]:
            pred, target = o["patch_boxes"][b, p].astype(np.float64), o["target_boxes"][b, p].astype(np.float64)
            l1 += np.abs(pred - target).sum()
            giou += np_giou_loss(pred, target)
    return (focal + l1_weight * l1 + giou_weight * giou) / count, focal / count, l1 / count, giou / count


def detection_inputs(seed, assigned_fraction):
    rng = np.random.default_rng(seed)

    def boxes():
        xy = rng.uniform(0, 0.6, (8, 4, 2))
        return np.concatenate([xy, xy + rng.uniform(0.05, 0.4, (8, 4, 2))], -1).astype(np.float32)

    return {"patch_logits": rng.normal(size=(8, 4, 3)).astype(np.float32) * 3,
            "patch_targets": rng.random((8, 4, 3)) < 0.3, "patch_valid": rng.random((8, 4, 3)) < 0.8,
            "patch_boxes": boxes(), "target_boxes": boxes(), "assigned": rng.random((8, 4)) < assigned_fraction}


def test_detection_loss_equals_a_numpy_loop_on_one_device_and_a_4x2_mesh():
    cases = [detection_inputs(0, 0.4), detection_inputs(1, 0.0)]  # the second: no patch assigned, normaliser 1
    assert cases[0]["assigned"].sum() > 1
    results = {}
    for name, mesh in (("one", make_mesh({"data": 1}, jax.devices()[:1])),
                       ("4x2", make_mesh({"data": 4, "fsdp": 2, "tensor": 1}))):
        loss_fn = jax.jit(losses.shard_loss(losses.detection_loss, mesh))
        results[name] = [jax.device_get(loss_fn({k: jax.device_put(v, batch_sharding(mesh)) for k, v in c.items()},
                                                {})) for c in cases]
    for c, (loss, metrics) in zip(cases, results["4x2"], strict=True):
        want, focal, l1, giou = np_detection_loss(c)
        np.testing.assert_allclose(loss, want, rtol=1e-5)
        np.testing.assert_allclose([metrics["loss_focal"], metrics["loss_l1"], metrics["loss_giou"]],
                                   [focal, l1, giou], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(metrics["box_giou"], 1 - giou, rtol=1e-5)
    for (one, one_metrics), (mesh, mesh_metrics) in zip(results["one"], results["4x2"], strict=True):
        np.testing.assert_allclose(mesh, one, rtol=1e-6)
        for key in one_metrics:
            np.testing.assert_allclose(mesh_metrics[key], one_metrics[key], rtol=1e-6, atol=1e-7)


# --- model heads -----------------------------------------------------------------------------------------------------
def test_box_head_starts_at_the_patch_cells_and_decodes_its_output_around_them():
    head = BoxHead(16, grid=2)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 8)), jnp.float32)
    # Output bias (log 3, 0, log 3, 0) on the (cx, cy, w, h) logits.
    bias = jnp.array([math.log(3), 0.0, math.log(3), 0.0])

    @jax.jit
    def run(key):
        params = nn.meta.unbox(head.init(key, x)["params"])
        moved = {**params, "out": {**params["out"], "bias": bias}}
        return params["out"], head.apply({"params": params}, x), head.apply({"params": moved}, x)

    out, at_init, moved = jax.device_get(run(jax.random.PRNGKey(0)))
    # The last layer starts at zero: each patch (row-major) is its own cell of the 2 x 2 grid.
    assert not out["kernel"].any() and not out["bias"].any()
    cells = [[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 0.5, 1], [0.5, 0.5, 1, 1]]
    np.testing.assert_allclose(at_init[0], cells, atol=1e-6)
    # With the bias: cx = sigmoid(log 3 + logit(cx0)): 0.25 -> 0.5, 0.75 -> 0.9; w = sigmoid(log 3 + logit(0.5)) =
    # 0.75; cy and h unchanged.
    want = []
    for cy in (0.25, 0.75):
        for cx in (0.5, 0.9):
            want.append([cx - 0.375, cy - 0.25, cx + 0.375, cy + 0.25])
    np.testing.assert_allclose(moved[0], want, atol=1e-6)


def test_fusion_ignores_padded_words_and_is_the_identity_at_zero_scale():
    rng = np.random.default_rng(0)
    visual = jnp.asarray(rng.normal(size=(1, 4, 16)), jnp.float32)
    words = rng.normal(size=(1, 6, 16)).astype(np.float32)
    mask = jnp.array([[True] * 4 + [False] * 2])
    fusion = Fusion(num_heads=2)
    params = random_params(fusion, visual, words, mask)
    apply = jax.jit(lambda p, w: fusion.apply({"params": p}, visual, w, mask))
    v0, w0 = apply(params, words)
    padded, real = words.copy(), words.copy()
    # (Random changes: a constant added to a word would be removed by the LayerNorm.)
    padded[:, 4:] += rng.normal(size=(1, 2, 16)) * 3  # change only the padding
    real[:, 0] += rng.normal(size=16) * 3  # change a real word
    v1, w1 = apply(params, padded)
    v2, _ = apply(params, real)
    np.testing.assert_allclose(v1, v0, atol=1e-6)  # the image never reads padding
    np.testing.assert_allclose(w1[:, :4], w0[:, :4], atol=1e-6)  # words read the image only, not each other
    assert np.abs(np.asarray(v2) - np.asarray(v0)).max() > 1e-3  # but it reads the real words
    zero = {**params, "scale_visual": np.zeros(16, np.float32), "scale_words": np.zeros(16, np.float32)}
    v3, w3 = apply(zero, words)
    np.testing.assert_array_equal(v3, visual)
    np.testing.assert_array_equal(w3, words)


# --- ViLD ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vild_ensemble():
    """ViLD-ensemble's model and random parameters (those of the detector: no text tower); without `image_head`
    they are the one-head model's."""
    config = load_config("configs/vild_shapes.py", VILD + ["--config.method.ensemble=True"])
    model = get_method(config).model()
    queries = (np.zeros((5, 16), np.float32), np.ones(5, np.float32))
    return model, random_params(model, np.zeros((1, 32, 32, 3), np.uint8), queries, method=ViLDCLIP.detect)


def test_vild_detect_is_the_objectness_times_the_softmax_and_the_ensemble_geometric_mean(vild_ensemble):
    model, params = vild_ensemble
    assert model.ensemble and model.region_temperature == 100
    single = ViLDCLIP(model.config, box_width=16, region_width=16, ensemble=False)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 32, 32, 3), np.uint8)
    classes = rng.normal(size=(5, 16)).astype(np.float32)
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    base = np.array([1, 0, 1, 1, 0], np.float32)

    @jax.jit
    def run(params):
        f = functools.partial(model.apply, {"params": params})
        grid = f(images, method="grid_features")
        boxes, objectness = f(grid, method="proposals")
        text, image = f(grid, boxes, method="region_embeddings")
        one = single.apply({"params": {k: v for k, v in params.items() if k != "image_head"}}, images,
                           (classes, base), method=ViLDCLIP.detect)
        return (f(images, (classes, base), method=ViLDCLIP.detect), one, boxes, objectness, text, image,
                f(text, classes, method="region_logits"), f(image, classes, method="region_logits"))

    (got_boxes, got), (one_boxes, one), boxes, objectness, text, image, text_logits, image_logits = \
        jax.device_get(run(params))
    np.testing.assert_allclose(got_boxes, boxes, atol=1e-6)
    np.testing.assert_allclose(one_boxes, boxes, atol=1e-6)
    # Region logits: 100 x cosine with [the normalised background embedding; the classes].
    background = np.asarray(params["background"]["embedding"])
    table = np.concatenate([background[None] / np.linalg.norm(background), classes])
    np.testing.assert_allclose(text_logits, 100 * text @ table.T, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(image_logits, 100 * image @ table.T, rtol=1e-4, atol=1e-3)
    p_text = np_softmax(text_logits.astype(np.float64))[..., 1:]
    p_image = np_softmax(image_logits.astype(np.float64))[..., 1:]
    assert np.abs(p_text - p_image).max() > 1e-3  # the two branches differ: the weighting is tested
    obj = sigmoid(objectness)
    want = np.zeros_like(p_text)
    for c in range(len(classes)):  # base: text^(2/3) image^(1/3); novel: text^(1/3) image^(2/3)
        w = 2 / 3 if base[c] else 1 / 3
        want[..., c] = p_text[..., c] ** w * p_image[..., c] ** (1 - w) * obj
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    # Without the ensemble: the text branch's probabilities times the objectness.
    np.testing.assert_allclose(one, p_text * obj[..., None], rtol=1e-4, atol=1e-7)


def test_vild_base_mask_and_its_training_step_zero_the_novel_logits(vild_config, tokenizer, vild_ensemble):
    method = get_method(vild_config)
    names = method.names()
    mask = method.base_mask(names)
    assert mask.sum() == 40 and {n for n, m in zip(names, mask, strict=True) if m == 0} == HELD_OUT_NAMES
    np.testing.assert_array_equal(method.base_mask(["red star", "red circle"]), [0, 1])  # follows the names given
    # Stand-in encoders: the texts' embeddings are random per prompt; the teacher's, colour_encoder's.
    text_table = {}

    def encode_texts(tokens):
        rows = [text_table.setdefault(tuple(t), np.random.default_rng(len(text_table)).normal(size=16))
                for t in np.asarray(tokens).tolist()]
        return np.stack([r / np.linalg.norm(r) for r in rows]).astype(np.float32)

    method.prepare(Preparation(None, tokenizer, True, colour_encoder(), encode_texts))
    arrays = method.arrays
    for name, field in method.fields().items():
        assert arrays[name].shape == (8, *field.shape), name
    np.testing.assert_allclose(np.linalg.norm(arrays["teacher"], axis=-1), 1, rtol=1e-5)
    data = method.train_set()
    for regions, labels, boxes, classes in zip(arrays["regions"], arrays["region_classes"], data.boxes, data.classes,
                                               strict=True):
        ious = np.array([[np_iou(r, b) for b in boxes] for r in regions])
        np.testing.assert_array_equal(labels, np.where(ious.max(1) >= 0.5, classes[ious.argmax(1)], -1))
    model = method.model()
    assert not model.ensemble
    batch = {k: v[:2] for k, v in arrays.items()}
    params = {k: v for k, v in vild_ensemble[1].items() if k != "image_head"}
    out = jax.device_get(jax.jit(method.step_fns(model).embed)(params, batch, None))
    logits, regions = out["region_logits"], out["image_regions"]  # one head: image_regions is the text branch
    assert logits.shape == (2, 4, 49)
    novel = np.flatnonzero(mask == 0)
    assert np.all(logits[..., 1 + novel] == 0)  # x 0: a constant logit 0 in the softmax
    base = np.flatnonzero(mask)
    np.testing.assert_allclose(logits[..., 1 + base], 100 * regions @ method.classes[base].T, rtol=1e-4, atol=1e-3)
    background = np.asarray(params["background"]["embedding"])
    np.testing.assert_allclose(logits[..., 0], 100 * regions @ (background / np.linalg.norm(background)), rtol=1e-4,
                               atol=1e-3)


# --- GLIP ------------------------------------------------------------------------------------------------------------
def test_glip_detect_scatters_each_phrase_end_score_and_word_features_are_causal(tokenizer):
    config = load_config("configs/glip_shapes.py", TINY + ["--config.method.fusion_heads=2"])
    method = get_method(config)
    model = method.model()
    names = class_names()[:4]
    tokens, ends, onehot = method.detection_queries(None, tokenizer, names)
    _, _, chunk_classes = prompt_chunks(tokenizer, names, CONTEXT)
    assert len(tokens) >= 2 and (chunk_classes == -1).any()  # several prompts, one with padding
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 32, 32, 3), np.uint8)
    first = tokenizer(["red star. blue circle."], CONTEXT)
    second = first.copy()
    second[0, 5] = 300 if first[0, 5] != 300 else 301  # change one token
    params = random_params(model, images[:1], (tokens[:1], ends[:1], onehot[:1]), method=GLIPCLIP.detect)

    @jax.jit
    def run(params):
        f = functools.partial(model.apply, {"params": params})
        visual = f(images, method="visual_features")
        aligned = [f(visual, jnp.broadcast_to(t, (2, CONTEXT)), method="align") for t in tokens]  # each alone
        return (f(images, (tokens, ends, onehot), method=GLIPCLIP.detect), aligned,
                f(np.concatenate([first, second]), method="word_features"),
                f(first, method="encode_text", normalize=False))

    (boxes, scores), aligned, words, pooled = jax.device_get(run(params))
    p = aligned[0][0].shape[1]
    assert boxes.shape == (2, len(tokens) * p, 4) and scores.shape == (2, len(tokens) * p, len(names))
    want = np.zeros(scores.shape)
    for q, (logits, prompt_boxes) in enumerate(aligned):
        np.testing.assert_allclose(boxes[:, q * p:(q + 1) * p], prompt_boxes, atol=1e-6)
        for k, c in enumerate(chunk_classes[q]):
            if c >= 0:  # the phrase's score: sigmoid of its last token's logit, in its class's column
                want[:, q * p:(q + 1) * p, c] = sigmoid(logits[:, :, ends[q, k]])
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-7)
    # Causal: positions before the changed token keep their features, the changed one does not.
    np.testing.assert_allclose(words[1, :5], words[0, :5], atol=1e-6)
    assert np.abs(words[1, 5] - words[0, 5]).max() > 1e-3
    # The end-of-text position's feature is the text embedding before normalisation (the pooled path).
    np.testing.assert_allclose(words[0, np.argmax(first[0])], pooled[0], rtol=1e-4, atol=1e-5)


# --- evaluation ------------------------------------------------------------------------------------------------------
def test_a_letterboxed_images_padding_holds_no_detection():
    """A box wholly in the padding below a wide image came back as a box of no height on its edge, and took one of
    the max_detections places; one reaching into the padding is cut to the image."""
    boxes = np.array([[0.1, 0.5, 0.3, 0.9], [0.1, 0.1, 0.3, 0.6]], np.float32)  # the image fills the top 0.4
    got = top_detections(boxes, np.array([[0.9], [0.8]], np.float32), extent=(1.0, 0.4))
    np.testing.assert_allclose(got.boxes, [[0.1, 0.1, 0.3, 0.4]])
    np.testing.assert_allclose(got.scores, [0.8])


def test_top_detections_suppress_overlaps_within_a_class_only():
    boxes = np.array([[0, 0, 0.5, 0.5], [0.05, 0, 0.55, 0.5], [0.6, 0.6, 1, 1]], np.float32)
    # Boxes 0 and 1: IoU 0.225 / 0.275 = 0.82 > 0.5. Same class: the weaker goes; box 2 is below min_score.
    got = top_detections(boxes, np.array([[0.9, 0], [0.8, 0], [0, 5e-4]], np.float32))
    np.testing.assert_array_equal(got.boxes, boxes[:1])
    np.testing.assert_allclose(got.scores, [0.9])
    np.testing.assert_array_equal(got.classes, [0])
    # Different classes: both kept, best first; max_detections 1 keeps the best only.
    scores = np.array([[0.9, 0], [0, 0.8], [0, 0]], np.float32)
    got = top_detections(boxes, scores)
    np.testing.assert_array_equal(got.boxes, boxes[:2])
    np.testing.assert_allclose(got.scores, [0.9, 0.8])
    np.testing.assert_array_equal(got.classes, [0, 1])
    assert len(top_detections(boxes, scores, max_detections=1).scores) == 1
    # Same class, IoU 0.1 / 0.4 = 0.25 < 0.5: both kept.
    apart = np.array([[0, 0, 0.5, 0.5], [0.3, 0, 0.8, 0.5]], np.float32)
    assert len(top_detections(apart, np.array([[0.9], [0.8]], np.float32)).scores) == 2


def test_clip_on_crops_rows_are_class_distributions_times_objectness():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 32, 32, 3), np.uint8)
    images[1] = (30, 120, 200)  # uniform: every crop is this colour
    boxes = np.array([[[0.1, 0.1, 0.5, 0.6], [0.3, 0.2, 0.9, 0.9], [0.0, 0.5, 0.4, 1.0]]] * 2, np.float32)
    objectness = rng.uniform(0.1, 1, (2, 3))
    classes = rng.normal(size=(4, 16))
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    encode = colour_encoder()
    scores = clip_on_crops(encode, images, boxes, objectness, classes, scale=10.0)
    assert scores.shape == (2, 3, 4) and np.all(scores >= 0)
    np.testing.assert_allclose(scores.sum(-1), objectness, rtol=1e-5)
    # The uniform image: every region's embedding is that colour's, so each row is softmax(10 e . classes) x obj.
    e = encode(images[1:2])[0]
    np.testing.assert_allclose(scores[1], objectness[1][:, None] * np_softmax(10 * e @ classes.T)[None], rtol=1e-4)


def test_detection_ap_is_one_for_perfect_detections_on_base_and_novel_and_zero_for_missed_novel():
    boxes = [np.array([[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.8]], np.float32),
             np.array([[0.2, 0.6, 0.7, 0.95]], np.float32)]
    classes = [np.array([0, 2], np.int32), np.array([1], np.int32)]
    data = DetectionSet(np.zeros((2, 32, 32, 3), np.uint8), boxes, classes, ["a", "b", "c"])
    subsets = {"base": [0, 1], "novel": [2]}
    perfect = [Detections(b, np.ones(len(b), np.float32), c) for b, c in zip(boxes, classes, strict=True)]
    got = detection_ap(data, perfect, subsets, "det")
    assert set(got) == {f"det{s}_ap{t}" for s in ("", "_base", "_novel") for t in ("", "50")}
    np.testing.assert_allclose(list(got.values()), 1.0)
    # The novel object's detection moved off it (IoU 0): novel AP 0, base untouched.
    moved = [Detections(np.array([boxes[0][0], [0.0, 0.0, 0.05, 0.05]], np.float32), np.ones(2, np.float32),
                        classes[0]), perfect[1]]
    got = detection_ap(data, moved, subsets, "det")
    np.testing.assert_allclose([got["det_novel_ap"], got["det_novel_ap50"]], 0.0, atol=1e-12)
    np.testing.assert_allclose([got["det_base_ap"], got["det_base_ap50"]], 1.0)


def test_a_sub_pixel_box_at_the_edge_still_crops_one_pixel_inside_the_image():
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, -1] = 255  # the last column white: a crop of it is mostly white (bicubic reads a neighbour's black)
    crops = crop_regions(image, np.array([[1, 0.5, 1, 0.5], [0.999, 0.5, 0.9995, 0.6]], np.float32), 8)
    assert crops.shape == (2, 2, 8, 8, 3) and crops[:, 0].min() > 128 and crops[:, 0].mean() > 200


def test_a_phrase_holding_the_separator_is_refused(tokenizer):
    with pytest.raises(ValueError, match="hold no '.'"):
        grounding_prompt(tokenizer, ["red star.", "blue circle"], 40)


# --- a COCO training file: what the method refuses, and its cache ----------------------------------------------------
def coco_training_file(root) -> tuple:
    """Three 32 px images of two boxes each, categories "cat" and "dog": (annotation file, image root)."""
    from clip_jax.data.coco import write_detection_folder

    images = [np.full((32, 32, 3), 60 * (i + 1), np.uint8) for i in range(3)]
    boxes = [np.array([[2, 2, 14, 14], [16, 16, 30, 30]], np.float32)] * 3
    path = write_detection_folder(root, "train", images, boxes, [np.array([0, 1])] * 3, ["cat", "dog"])
    return path, root / "images" / "train"


def coco_vild(path, image_root, *more):
    return get_method(load_config("configs/vild_shapes.py", [*VILD, f"--config.method.annotations={path}",
                                                             f"--config.method.image_root={image_root}", *more]))


def test_an_edited_annotation_file_is_refused_rather_than_its_cached_arrays_trained_on(tmp_path):
    """The cache `detection_train.npz` is named by settings that hold the annotation file's path only: after an edit
    in place (a category renamed, boxes moved) a relaunch would train on the old boxes under the new names."""
    import json

    path, image_root = coco_training_file(tmp_path / "coco")
    workdir = tmp_path / "run"
    workdir.mkdir()
    prep = Preparation(workdir, None, True, colour_encoder(), None)

    def arrays():
        method = coco_vild(path, image_root)
        method.prep = prep  # the arrays alone: the class embeddings of `prepare` are not read here
        return method.arrays

    first = arrays()
    assert (workdir / "detection_train.npz").exists() and "class_names" not in first and len(first["image"]) == 3
    np.testing.assert_array_equal(arrays()["patch_boxes"], first["patch_boxes"])  # unchanged: the cache is read
    data = json.loads(path.read_text())
    data["annotations"][0]["bbox"] = [4, 4, 8, 8]  # boxes moved, the names the same
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="as it was before an edit: restore the file") as error:
        arrays()
    assert "\n" not in str(error.value)
    data["categories"][0]["name"] = "kitten"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"before an edit \(categories without \['cat'\]; with \['kitten'\] too\)"):
        arrays()


@pytest.mark.parametrize("content, expected", [
    ("{not json", "is not JSON"),
    ('{"images": [], "annotations": [], "categ', "is not JSON"),  # truncated
    ('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "cat"}]}', "has no annotations: a detector"),
])
def test_a_training_file_that_is_not_json_or_has_no_box_is_one_line(tmp_path, content, expected):
    path = tmp_path / "instances.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=expected) as error:
        coco_vild(path, tmp_path).check(None)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_a_training_file_whose_boxes_are_all_novel_is_refused(tmp_path):
    path, image_root = coco_training_file(tmp_path / "coco")
    coco_vild(path, image_root, "--config.method.novel=('dog',)").check(None)
    with pytest.raises(ConfigError, match="no annotations other than crowd regions and method.novel"):
        coco_vild(path, image_root, "--config.method.novel=('cat', 'dog')").check(None)


def test_shapes_detection_is_skipped_with_a_warning_for_a_detector_trained_on_a_coco_file(tmp_path, caplog):
    """data.source keeps its default "shapes" when method.annotations is set: the config's default shapes_detection
    entry must not score shapes classes the detector never saw."""
    import types

    from clip_jax.evaluate.detection import ShapesDetectionEval, run_shapes_detection

    path, image_root = coco_training_file(tmp_path / "coco")
    method = coco_vild(path, image_root)
    ctx = types.SimpleNamespace(config=method.config, method=method, encoder=None, texts=None, tokenizer=None)
    with caplog.at_level("WARNING"):
        assert run_shapes_detection(ctx, "det_on_coco", ShapesDetectionEval()) == {}
    assert "evals.det_on_coco: skipped, the detector is trained on method.annotations" in caplog.text


def test_a_name_glip_cannot_read_is_refused_in_one_short_line(tokenizer):
    """A name over the context was refused with grounding_prompt's message inside, quoting the name twice: 1,500
    characters and more for one long query. A '.' inside a name (3.5 inch) was reported as a name too long."""
    long_name = "red star " * 200
    with pytest.raises(ConfigError) as info:
        prompt_chunks(tokenizer, ["blue circle", long_name], CONTEXT)
    message = str(info.value)
    assert len(message) < 200 and "\n" not in message and message.count("red star") <= 8, message
    assert f"({len(long_name):,} characters in all) alone has" in message
    assert f"reads {CONTEXT - 2}: shorten it" in message
    with pytest.raises(ConfigError, match=r"the name '3.5 inch blue circle' is empty or holds '\.'"):
        prompt_chunks(tokenizer, ["3.5 inch blue circle"], CONTEXT)


def test_glip_training_names_a_category_that_no_prompt_can_hold(tokenizer):
    """A category named with a '.' (or with no name, or too long alone) was refused with "lower
    method.prompt_classes", which cannot make one name fit."""
    import types

    method = get_method(load_config("configs/glip_shapes.py"))
    data = DetectionSet(np.zeros((1, 8, 8, 3), np.uint8), [np.zeros((1, 4), np.float32)], [np.zeros(1, np.int32)],
                        ["st. square", "blue circle"])
    with pytest.raises(ConfigError, match=r"method glip: the category 'st. square' cannot be a phrase of a prompt "
                                          r"\(phrases must be non-empty and hold no '\.'.*\); rename it in the "
                                          "annotations"):
        method.extra_arrays(types.SimpleNamespace(tokenizer=tokenizer), data)
