"""Open-vocabulary detection evaluation: box AP with pycocotools' COCOeval on base and novel classes apart.

A detection method's predict function (`detect`, models/detection.py) gives every image N candidate boxes with a
score per class; `top_detections` keeps, per image, the best (box, class) pairs after per-class non-maximum
suppression (IoU 0.5, ViLD's), at most `max_detections` (COCO's 100). AP is COCOeval's on the ground truth of the
evaluated images (data/detection.py::DetectionSet.ground_truth), restricted to the base or the novel categories
(LVIS's AP_r is the second kind).

Evaluations (chosen by `config.evals` entries, evaluate/suite.py):
- `shapes_detection`: `test_novel` scenes of 3-6 objects (one held-out pair among seen ones in each); AP and AP50 on
  the 40 seen pairs (base) and the 8 held-out pairs (novel).
- `coco_detection`: a COCO instances file and its images; `novel` names the categories reported apart; optionally
  the predictions written in COCO's results format in the original images' pixels (`results_file`).

`clip_on_crops` is the training-free baseline of the ViLD paper: a CLIP classifies each proposal's crop.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

import numpy as np
from etils import epath

from clip_jax.data.coco import CocoDetection, coco_ap, detections_to_results, to_original_xywh, write_coco_results
from clip_jax.data.detection import (
    DetectionSet,
    category_names,
    coco_detection_set,
    region_crop_embeddings,
    shapes_detection_set,
)
from clip_jax.data.images import letterbox_geometry
from clip_jax.errors import ConfigError
from clip_jax.evaluate import tell_skipped, trained_on_shapes
from clip_jax.files import refuse_replacing, refuse_run_files
from clip_jax.models.boxes import batched_nms


@dataclasses.dataclass
class Detections:
    """One image's detections: boxes float32 [n, 4] (normalised xyxy), scores [n], classes int32 [n]."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray


def top_detections(boxes: np.ndarray, scores: np.ndarray, max_detections: int = 100, nms_iou: float = 0.5,
                   min_score: float = 1e-3, candidates: int = 1000, extent: tuple[float, float] = (1.0, 1.0)
                   ) -> Detections:
    """One image's detections from its candidates (boxes [N, 4], cut to the image; scores [N, C]): every (box, class)
    pair scoring at least `min_score`, the best `candidates` of them, per-class NMS at `nms_iou`, the best
    `max_detections` kept. `extent`: the image's part of the square (a letterboxed image's width and height, the rest
    padding): boxes are cut to it, and a box left without area is no detection."""
    boxes = np.clip(boxes, 0.0, np.array([*extent, *extent]))  # a box head may reach past the image's edge
    inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    rows, classes = np.nonzero((scores >= min_score) & inside[:, None])
    values = scores[rows, classes]
    order = np.argsort(-values, kind="stable")[:candidates]
    rows, classes, values = rows[order], classes[order], values[order]
    keep = batched_nms(boxes[rows], values, classes, nms_iou, max_detections)
    return Detections(boxes[rows[keep]].astype(np.float32), values[keep].astype(np.float32),
                      classes[keep].astype(np.int32))


def detect(encoder, queries, images: np.ndarray, extents: Sequence[tuple[float, float]] | None = None,
           **kwargs) -> list[Detections]:
    """The detections of every image (`top_detections` of the model's `detect` under `queries`); `extents`: each
    letterboxed image's part of its square (`letterbox_extent`)."""
    boxes, scores = encoder.predict("detect", images, queries)
    extents = extents or [(1.0, 1.0)] * len(boxes)
    return [top_detections(b, s, extent=e, **kwargs) for b, s, e in zip(boxes, scores, extents, strict=True)]


def letterbox_extent(width: int, height: int, size: int) -> tuple[float, float]:
    """The part of the square a width x height image fills once letterboxed (`images.letterbox`), normalised."""
    new_width, new_height = letterbox_geometry(width, height, size)
    return new_width / size, new_height / size


def prepared_queries(trained, texts, queries: Sequence[str], what: str = "--queries"):
    """A detector run's (ViLD's or GLIP's) prompts of `queries`, `texts` embedding token ids; ConfigError for a run
    that is not a detector, or two queries that are one text to it (`what`: how the message names them)."""
    from clip_jax.evaluate.classify import refuse_same_tokens

    config = trained.config
    if not hasattr(trained.method, "detection_queries"):
        raise ConfigError(f"the workdir's run is a {config.method.name} run, not a detector: train one with "
                          "configs/vild_shapes.py or configs/glip_shapes.py (docs/detection.md)")
    # the prompts the detector builds: ViLD's templates around each name, GLIP's names as they are (one prompt)
    templates = tuple(config.method.get("templates") or ("{}",))
    context = config.model.text.context_length
    # (ViLD cuts a long prompt at the context, said; GLIP refuses one)
    refuse_same_tokens(what, queries, trained.tokenizer, context, templates,
                       tell_cut=bool(config.method.get("templates")))
    return trained.method.detection_queries(texts, trained.tokenizer, list(queries))


def letterbox_fill(config) -> tuple[int, int, int]:
    """The colour a detector's input is padded with: the model's mean, zeros once normalised (as ViLD's and GLIP's)."""
    return tuple(round(255 * m) for m in config.model.image_mean)


def letterbox_to_original_xyxy(boxes: np.ndarray, width: int, height: int, size: int) -> np.ndarray:
    """Pixel xyxy boxes [n, 4] (float64) in the original width x height image of normalised xyxy boxes [n, 4] in its
    `letterbox` to `size` (each axis scaled by its own rounded ratio, as PIL resized it), clipped to the image: a box
    may reach into the padding."""
    new_width, new_height = letterbox_geometry(width, height, size)
    scale = np.array([width / new_width, height / new_height] * 2) * size
    return np.clip(np.asarray(boxes, np.float64).reshape(-1, 4) * scale, 0, [width, height, width, height])


def in_original_pixels(det: Detections, queries: Sequence[str], width: int, height: int, size: int) -> list[dict]:
    """One letterboxed image's detections as {"label", "score", "box_xyxy"} in its original width x height pixels."""
    xyxy = letterbox_to_original_xyxy(det.boxes, width, height, size)
    return [{"label": queries[c], "score": round(float(score), 4), "box_xyxy": [round(float(v), 1) for v in box]}
            for box, score, c in zip(xyxy, det.scores, det.classes, strict=True)]


def results_in_model_pixels(detections: Sequence[Detections], size: int) -> list[dict]:
    """COCO results of the detections of images 1..N (`DetectionSet.ground_truth`'s ids) in the model image's
    pixels, category id = class index + 1."""
    results = []
    for i, det in enumerate(detections):
        xywh = np.concatenate([det.boxes[:, :2], det.boxes[:, 2:] - det.boxes[:, :2]], axis=1) * size
        results += detections_to_results(i + 1, xywh, det.scores, det.classes + 1)
    return results


def detection_ap(data: DetectionSet, detections: Sequence[Detections], subsets: dict[str, Sequence[int]],
                 prefix: str) -> dict[str, float]:
    """`{prefix}_{subset}_ap` and `_ap50` for each subset of class indices (COCOeval restricted to them), and
    `{prefix}_ap`, `{prefix}_ap50` over all classes."""
    truth = data.ground_truth()
    results = results_in_model_pixels(detections, data.images.shape[1])
    out = {}
    for subset, classes in {"": None, **subsets}.items():
        ap = coco_ap(truth, results, None if classes is None else [c + 1 for c in classes])
        key = f"{prefix}_{subset}" if subset else prefix
        out[f"{key}_ap"], out[f"{key}_ap50"] = ap["ap"], ap["ap50"]
    return out


def clip_on_crops(encode_images: Callable[[np.ndarray], np.ndarray], images: np.ndarray, boxes: np.ndarray,
                  objectness: np.ndarray, classes: np.ndarray, scale: float, crop_scales=(1.0, 1.5)) -> np.ndarray:
    """The R-CNN-style baseline: scores [N, R, C] of each proposal (boxes [N, R, 4] with objectness probabilities
    [N, R]) as a CLIP's softmax over the classes (normalised embeddings [C, D], at the CLIP's temperature `scale`)
    of the proposal's 1x and 1.5x crops, times the objectness: a CLIP has no background class."""
    size = images.shape[1]
    regions = region_crop_embeddings(encode_images, images, boxes, size, crop_scales)
    logits = scale * regions @ classes.T
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(-1, keepdims=True) * objectness[..., None]


# --- the evaluators ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShapesDetectionEval:
    every_steps: int | None = None
    num_examples: int | None = None  # scenes; None: eval.num_examples
    min_objects: int = 3  # the scenes' object count, whatever the run trained on
    max_objects: int = 6
    max_detections: int = 100
    nms_iou: float = 0.5


def _method_queries(ctx, name: str):
    if not hasattr(ctx.method, "detection_queries"):
        tell_skipped(name, f"method {ctx.config.method.name} does not detect (ViLD's and GLIP's do)")
        return None
    return lambda names: ctx.method.detection_queries(ctx.texts, ctx.tokenizer, names)


def run_shapes_detection(ctx, name: str, entry: ShapesDetectionEval) -> dict[str, float]:
    queries = _method_queries(ctx, name)
    if queries is None:
        return {}
    annotations = ctx.config.method.get("annotations")
    if annotations:  # data.source keeps its default "shapes" then: the method's own data decides
        tell_skipped(name, f"the detector is trained on method.annotations {annotations}, not on shapes scenes, whose "
                     "classes it never saw (drop the entry; a coco_detection entry scores your own data)")
        return {}
    if not trained_on_shapes(ctx.config, name):
        return {}
    data = shapes_detection_set(ctx.config, "test_novel", ctx.num_examples(entry), (entry.min_objects,
                                                                                  entry.max_objects))
    base = np.flatnonzero(ctx.method.base_mask(data.names))
    novel = np.flatnonzero(ctx.method.base_mask(data.names) == 0)
    detections = detect(ctx.encoder, queries(data.names), data.images, max_detections=entry.max_detections,
                        nms_iou=entry.nms_iou)
    return detection_ap(data, detections, {"base": base, "novel": novel}, name)


@dataclasses.dataclass(frozen=True)
class CocoDetectionEval:
    annotations: str = ""  # a COCO instances file
    image_root: str = ""  # its images' folder
    novel: tuple = ()  # category names reported apart (`<name>_novel_ap`): those left out of training
    num_examples: int | None = None  # None: every image
    every_steps: int | None = None
    max_detections: int = 100
    nms_iou: float = 0.5
    results_file: str = ""  # write the predictions here (COCO results format, original pixels)


_RESULT_KEYS = {"image_id", "category_id", "bbox", "score"}


def _earlier_results(path: epath.Path) -> bool:
    """Whether `path` holds a COCO results list (as `write_coco_results` writes): an earlier evaluation's, which
    every evaluation of a run (every_steps) writes anew."""
    data = json.loads(path.read_text())
    return isinstance(data, list) and all(isinstance(r, dict) and _RESULT_KEYS <= r.keys() for r in data)


def check_coco_detection(name: str, entry: CocoDetectionEval, workdir: str | os.PathLike | None = None) -> None:
    """A ConfigError for an entry that would fail or destroy a file: `novel` names that are not categories of the
    annotation file; a `results_file` where a clip_jax run keeps its files (`files.refuse_run_files`: its top level,
    checkpoints/ ...; the run's `workdir` counts before a first launch makes it; a folder of its own inside the run
    is fine), equal to the annotation file, or an existing file other than an earlier results list (the run's
    config.json, the user's own files would be overwritten)."""
    if entry.novel:
        names = category_names(entry.annotations)
        unknown = sorted(set(entry.novel) - set(names))
        if unknown:
            raise ConfigError(f"evals.{name}.novel names {unknown}, which are not categories of {entry.annotations}; "
                              f"name some of its {len(names)} categories (e.g. {names[:3]})")
    if entry.results_file:
        flag = f"evals.{name}.results_file"
        refuse_run_files(entry.results_file, flag, workdir, is_file=True)
        refuse_replacing(entry.results_file, _earlier_results, [entry.annotations], flag=flag, by="evaluation")


def run_coco_detection(ctx, name: str, entry: CocoDetectionEval) -> dict[str, float]:
    queries = _method_queries(ctx, name)
    if queries is None:
        return {}
    check_coco_detection(name, entry)  # again: the file may have been edited, or a workdir made there, since
    size = ctx.config.model.vision.image_size
    source = CocoDetection(entry.annotations, entry.image_root, size)  # read once: an LVIS file takes seconds
    data = coco_detection_set(entry.annotations, entry.image_root, size, entry.num_examples, source)
    novel = [data.names.index(n) for n in entry.novel]
    subsets = {"novel": novel, "base": [c for c in range(len(data.names)) if c not in novel]} if novel else {}
    detections = detect(ctx.encoder, queries(data.names), data.images, max_detections=entry.max_detections,
                        nms_iou=entry.nms_iou)
    if entry.results_file:
        write_coco_results(entry.results_file, original_results(source, detections))
    return detection_ap(data, detections, subsets, name)


def original_results(source: CocoDetection, detections: Sequence[Detections]) -> list[dict]:
    """COCO results of a file's first len(detections) images in their original pixels and category ids."""
    images = {im["id"]: im for im in source.ground_truth["images"]}
    results = []
    for image_id, det in zip(source.image_ids, detections, strict=False):
        im = images[image_id]
        xywh = to_original_xywh(det.boxes, im["width"], im["height"], source.image_size)
        results += detections_to_results(image_id, xywh, det.scores,
                                         np.asarray(source.category_ids)[det.classes])
    return results
