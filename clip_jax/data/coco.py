"""Object detection data in the COCO format, for training and evaluating open-vocabulary detectors:

    an instances JSON     {"images": [{id, file_name, width, height}],
                           "annotations": [{id, image_id, category_id, bbox: [x, y, w, h] in pixels,
                                            iscrowd (optional, 0), area (optional)}],
                           "categories": [{id, name}]}
    image_root/<file_name>  the images

`CocoDetection` reads one split as a random-access source of images resized and centre-cropped as CLIP's eval
transform (`resize_center_crop`), with their boxes carried through the same transform (normalised xyxy, see
`clip_jax.models.boxes`). Every problem with a file is a `DetectionError` of one line naming it, found when the
source is built wherever that is cheap (the JSON, which image files exist), so that an evaluation stops at its start.

`coco_ap` scores detections with pycocotools' COCOeval; `to_original_xywh` and `detections_to_results` turn a
model's boxes back into COCO results on the original images. `write_detection_folder` writes the layout, for tests
and procedural benchmarks.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import math
import numbers
import os
from collections.abc import Sequence

import numpy as np
from etils import epath
from PIL import Image

from clip_jax.data.images import (
    DEFAULT_MAX_IMAGE_BYTES,
    RefusedFile,
    bad_image_reason,
    center_crop_geometry,
    decode_error_text,
    decode_image,
    read_image_file,
    resize_center_crop,
)
from clip_jax.data.tokenizer import READS_ALIKE, clean_text, same_text
from clip_jax.errors import ConfigError, one_line
from clip_jax.files import is_remote, write_atomic


class DetectionError(ConfigError):
    """A detection annotation file or image that cannot be used, in one line naming the file, the problem and what to
    do. A ConfigError (so a ValueError), so that the command line reports it as one line, like any bad input."""


_KEYS = ("images", "annotations", "categories")
_IMAGE_KEYS = ("id", "file_name", "width", "height")


def geometry(width: int, height: int, image_size: int) -> tuple[float, float, int, int]:
    """(scale_x, scale_y, left, top) of `resize_center_crop` of a width x height image to image_size: a pixel
    coordinate (x, y) of the original lands at (x * scale_x - left, y * scale_y - top) in the crop.

    The sizes and offsets are images.py's (`center_crop_geometry`). The scales are those of the resized image, new
    size / old size per axis, rather than the one image_size / shorter side that sets the new size: the longer side's
    size is truncated to whole pixels, and PIL's resize stretches each axis by its own ratio, so a single scale would
    misplace boxes by up to a pixel."""
    if (width, height) == (image_size, image_size):
        return 1.0, 1.0, 0, 0
    new_width, new_height, left, top = center_crop_geometry(width, height, image_size)
    return new_width / width, new_height / height, left, top


def _to_crop(boxes_xywh: np.ndarray, width: int, height: int, image_size: int) -> np.ndarray:
    """Pixel xywh boxes [n, 4] of the original image to pixel xyxy boxes of the crop, clipped to it."""
    scale_x, scale_y, left, top = geometry(width, height, image_size)
    x0, y0 = boxes_xywh[:, 0], boxes_xywh[:, 1]
    x1, y1 = x0 + boxes_xywh[:, 2], y0 + boxes_xywh[:, 3]
    crop = np.stack([x0 * scale_x - left, y0 * scale_y - top, x1 * scale_x - left, y1 * scale_y - top], axis=-1)
    return np.clip(crop, 0, image_size)


def to_original_xywh(boxes: np.ndarray, width: int, height: int, image_size: int) -> np.ndarray:
    """Pixel (x, y, w, h) boxes [n, 4] (float64) in the original width x height image of normalised xyxy boxes
    [n, 4] in its `resize_center_crop` to image_size: the inverse of the transform `CocoDetection` applies (boxes
    it clipped to the crop are not restored), for writing predictions as COCO results."""
    scale_x, scale_y, left, top = geometry(width, height, image_size)
    pixels = np.asarray(boxes, np.float64).reshape(-1, 4) * image_size
    x0, x1 = (pixels[:, 0] + left) / scale_x, (pixels[:, 2] + left) / scale_x
    y0, y1 = (pixels[:, 1] + top) / scale_y, (pixels[:, 3] + top) / scale_y
    return np.stack([x0, y0, x1 - x0, y1 - y0], axis=-1)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def read_annotation_json(path: epath.PathLike) -> dict:
    """The instances JSON of `path` as a dict holding the three lists, or a DetectionError of one line (missing,
    unreadable, not JSON, truncated, not an object, a list missing)."""
    path = epath.Path(path)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise DetectionError(f"annotation file {path} does not exist; give the COCO instances JSON of the split"
                             ) from None
    except OSError as e:
        raise DetectionError(f"cannot read annotation file {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DetectionError(f"annotation file {path} is not JSON ({one_line(e)}); give a COCO instances JSON"
                             ) from None
    if not isinstance(data, dict):
        raise DetectionError(f"annotation file {path} holds a JSON {type(data).__name__}, not an object; give a "
                             f"COCO instances JSON (an object with keys {', '.join(_KEYS)})")
    missing = [key for key in _KEYS if not isinstance(data.get(key), list)]
    if missing:
        raise DetectionError(f"annotation file {path} has no list {missing[0]!r}; a COCO instances JSON has the "
                             f"lists {', '.join(_KEYS)} (an empty list is fine)")
    return data


def _check_entries(data: dict, path: epath.Path) -> None:
    """Every check of the JSON's content, in one line each naming the file and the entry."""
    image_ids: set = set()
    for image in data["images"]:
        absent = [key for key in _IMAGE_KEYS if key not in image] if isinstance(image, dict) else ["all keys"]
        if absent:
            raise DetectionError(f"annotation file {path}: image entry {image!r:.80} lacks {absent[0]!r}; each image "
                                 f"needs {', '.join(_IMAGE_KEYS)}")
        if image["id"] in image_ids:
            raise DetectionError(f"annotation file {path} lists image id {image['id']!r} twice; give each image a "
                                 "unique id")
        if not (isinstance(image["width"], int) and isinstance(image["height"], int)
                and image["width"] > 0 and image["height"] > 0):
            raise DetectionError(f"annotation file {path}: image {image['id']!r} has size {image['width']!r} x "
                                 f"{image['height']!r}; width and height must be positive integers (pixels)")
        image_ids.add(image["id"])
    sizes = {image["id"]: (image["width"], image["height"]) for image in data["images"]}
    category_ids: set = set()
    for category in data["categories"]:
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise DetectionError(f"annotation file {path}: category entry {category!r:.80} needs an id and a name")
        if category["id"] in category_ids:
            raise DetectionError(f"annotation file {path} lists category id {category['id']!r} twice; give each "
                                 "category a unique id")
        name = category["name"]
        if not isinstance(name, str) or not clean_text(name):  # a class is named in text: no text, no query
            raise DetectionError(f"annotation file {path}: category {category['id']!r} has the name {name!r}; give "
                                 "each category a name")
        category_ids.add(category["id"])
    if pair := same_text([c["name"] for c in data["categories"]]):  # two ids of one text: one query
        first, second = (data["categories"][i] for i in pair)
        same = (f"both {second['name']!r}" if first["name"] == second["name"] else
                f"{first['name']!r} and {second['name']!r}, one text to CLIP ({READS_ALIKE})")
        raise DetectionError(f"annotation file {path} names categories {first['id']!r} and {second['id']!r} {same}; "
                             "give each category a unique name (or merge them)")
    for annotation in data["annotations"]:
        if not isinstance(annotation, dict) or not all(k in annotation for k in ("image_id", "category_id", "bbox")):
            raise DetectionError(f"annotation file {path}: annotation {annotation!r:.80} needs an image_id, a "
                                 "category_id and a bbox")
        name = f"annotation {annotation.get('id', '(no id)')!r}"
        if annotation["image_id"] not in image_ids:
            raise DetectionError(f"annotation file {path}: {name} refers to image id {annotation['image_id']!r}, "
                                 "which is not in its images; add the image or remove the annotation")
        if annotation["category_id"] not in category_ids:
            raise DetectionError(f"annotation file {path}: {name} has category id {annotation['category_id']!r}, "
                                 "which is not in its categories; add the category or remove the annotation")
        bbox = annotation["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
            raise DetectionError(f"annotation file {path}: {name} has bbox {bbox!r:.80}; a bbox is 4 numbers "
                                 "[x, y, width, height] in pixels")
        if bbox[2] <= 0 or bbox[3] <= 0:
            raise DetectionError(f"annotation file {path}: {name} has bbox {bbox!r} of width or height <= 0; fix "
                                 "or remove it")
        width, height = sizes[annotation["image_id"]]
        # A box that only reaches past the edge is clipped when read; one wholly outside marks nothing in the image
        # (a wrong image id, or boxes of another image size): refused like the other impossible boxes.
        if bbox[0] >= width or bbox[1] >= height or bbox[0] + bbox[2] <= 0 or bbox[1] + bbox[3] <= 0:
            raise DetectionError(f"annotation file {path}: {name} has bbox {bbox!r}, wholly outside its "
                                 f"{width}x{height} image {annotation['image_id']!r}; fix or remove it")


def read_checked_annotations(path: epath.PathLike) -> dict:
    """The instances JSON of `path` with every entry checked (`read_annotation_json`, then each image, category and
    annotation)."""
    key = _file_key(path)  # before the read: an edit meanwhile gives the next read another key
    data = read_annotation_json(path)
    _check_entries(data, epath.Path(path))
    if key is not None:
        _summaries[key] = _summary(data)
    return data


@dataclasses.dataclass(frozen=True)
class AnnotationSummary:
    """What a launch asks of a COCO file beside its boxes: the categories (dicts with id and name, as in the file),
    the ids of those with a box that is not a crowd region, and the number of annotations."""

    categories: tuple[dict, ...]
    boxed_category_ids: frozenset
    annotations: int


# Summaries of the checked local files, by (path, modification time, size): a launch asks a file's categories and
# whether it has boxes several times, and an LVIS-sized JSON takes seconds to parse and gigabytes to hold, so the
# parsed file itself is not kept.
_summaries: dict[tuple, AnnotationSummary] = {}


def _file_key(path: epath.PathLike) -> tuple | None:
    if is_remote(os.fspath(path)):
        return None
    try:
        stat = os.stat(path)
    except OSError:  # missing: read_annotation_json's message
        return None
    return os.path.realpath(path), stat.st_mtime_ns, stat.st_size


def _summary(data: dict) -> AnnotationSummary:
    return AnnotationSummary(tuple({"id": c["id"], "name": c["name"]} for c in data["categories"]),
                             frozenset(a["category_id"] for a in data["annotations"] if not a.get("iscrowd", 0)),
                             len(data["annotations"]))


def annotation_summary(path: epath.PathLike) -> AnnotationSummary:
    """The summary of the checked file `path` (`read_checked_annotations`), parsed once per launch while the local
    file is unchanged."""
    key = _file_key(path)
    if key is not None and key in _summaries:
        return _summaries[key]
    return _summary(read_checked_annotations(path))


class CocoDetection:
    """Random-access source of one split in the COCO format (see the module docstring): item i is {"image": uint8
    [S, S, 3], "boxes": float32 [n, 4] normalised xyxy in that image, "classes": int32 [n] indices into
    `category_ids`, "image_id": int}. The image is `resize_center_crop`ped to S = image_size and its boxes with it:
    clipped to the crop, and dropped when less than a pixel wide or high at size S. Crowd annotations (iscrowd 1,
    a region of many objects) are not returned; COCOeval reads them from `ground_truth`, to ignore detections on
    them."""

    def __init__(self, annotation_file: epath.PathLike, image_root: epath.PathLike, image_size: int,
                 max_image_bytes: int | None = None):
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.annotation_file, self.image_root = epath.Path(annotation_file), epath.Path(image_root)
        self.image_size = image_size
        self.max_image_bytes = DEFAULT_MAX_IMAGE_BYTES if max_image_bytes is None else max_image_bytes
        self.ground_truth = read_checked_annotations(self.annotation_file)
        categories = sorted(self.ground_truth["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in categories]
        self.category_names = [c["name"] for c in categories]
        self._images = list(self.ground_truth["images"])
        self.image_ids = [image["id"] for image in self._images]
        class_index = {category_id: i for i, category_id in enumerate(self.category_ids)}
        self._annotations: dict = {image_id: [] for image_id in self.image_ids}
        for annotation in self.ground_truth["annotations"]:
            if not annotation.get("iscrowd", 0):
                self._annotations[annotation["image_id"]].append((annotation["bbox"],
                                                                  class_index[annotation["category_id"]]))
        if not is_remote(os.fspath(self.image_root)):  # a stat per file is cheap here; on an object store, a request
            self._check_files_exist()

    def _check_files_exist(self) -> None:
        absent = [path for path in map(self.image_path, range(len(self))) if not os.path.isfile(path)]
        if absent:
            raise DetectionError(f"image {absent[0]} does not exist (missing: {len(absent)} of the {len(self)} images "
                                 f"of {self.annotation_file}); add them or remove them from the annotation file")

    def image_path(self, index: int) -> epath.Path:
        return self.image_root / self._images[index]["file_name"]

    def __len__(self) -> int:
        return len(self._images)

    def _decode(self, index: int) -> np.ndarray:
        path, entry = self.image_path(index), self._images[index]
        try:
            data = read_image_file(path, self.max_image_bytes)
        except RefusedFile as e:
            raise DetectionError(f"image {e}; replace it with an image file or raise max_image_bytes") from None
        except FileNotFoundError:
            raise DetectionError(f"image {path} does not exist; add it or remove it from {self.annotation_file}"
                                 ) from None
        except OSError as e:
            raise DetectionError(f"cannot read image {path}: {e.strerror or e}") from None
        try:
            image = decode_image(data)[0]
        except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt data
            problem = f"{bad_image_reason(e)}: {decode_error_text(e)}"
            raise DetectionError(f"cannot decode image {path} ({problem}); re-export it or remove it from "
                                 f"{self.annotation_file}") from None
        height, width = image.shape[:2]
        if (width, height) != (entry["width"], entry["height"]):  # its boxes are in the pixels the JSON states
            raise DetectionError(f"image {path} is {width}x{height} but {self.annotation_file} says "
                                 f"{entry['width']}x{entry['height']}; fix the size in the annotation file")
        return image

    def __getitem__(self, index: int) -> dict:
        image = self._decode(index)
        entry, size = self._images[index], self.image_size
        annotations = self._annotations[entry["id"]]
        boxes_xywh = np.asarray([bbox for bbox, _ in annotations], np.float64).reshape(-1, 4)
        boxes = _to_crop(boxes_xywh, entry["width"], entry["height"], size)
        keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
        classes = np.asarray([c for _, c in annotations], np.int32)
        return {"image": resize_center_crop(image, size), "boxes": (boxes[keep] / size).astype(np.float32),
                "classes": classes[keep], "image_id": entry["id"]}


def _ground_truth_for_eval(ground_truth: dict) -> dict:
    """A copy of `ground_truth` (COCOeval writes into its annotations) with the optional keys COCOeval reads filled
    in: iscrowd 0, and the box's area where no (segmentation) area is given."""
    data = copy.deepcopy(ground_truth)
    for annotation in data["annotations"]:
        annotation.setdefault("iscrowd", 0)
        annotation.setdefault("area", annotation["bbox"][2] * annotation["bbox"][3])
    return data


def coco_ap(ground_truth: dict, results: list[dict], category_ids: Sequence[int] | None = None) -> dict[str, float]:
    """{"ap": AP@[.5:.95], "ap50", "ap75"} of detection `results` (COCO results format) against `ground_truth` (a
    COCO instances dict) by pycocotools' COCOeval (bbox, up to 100 detections an image), over `category_ids` only
    when given. NaN where no ground truth box is scored (every category selected lacks one: there is nothing to
    recall, so no AP); zeros for no results. Raises ValueError for results of an image or category the ground
    truth lacks, or a category_ids entry it lacks."""
    from pycocotools.coco import COCO  # imported here: pycocotools is needed by the evaluation only
    from pycocotools.cocoeval import COCOeval

    known_images = {image["id"] for image in ground_truth["images"]}
    known_categories = {category["id"] for category in ground_truth["categories"]}
    for what, known, values in (("image", known_images, [r["image_id"] for r in results]),
                                ("category", known_categories, [r["category_id"] for r in results]),
                                ("category", known_categories, list(category_ids or []))):
        unknown = sorted(set(values) - known, key=str)
        if unknown:
            raise ValueError(f"{what} id {unknown[0]!r} is not in the ground truth's {what}s")
    selected = set(known_categories if category_ids is None else category_ids)
    if not any(a["category_id"] in selected and not a.get("iscrowd", 0) for a in ground_truth["annotations"]):
        return {"ap": math.nan, "ap50": math.nan, "ap75": math.nan}
    if not results:  # COCO.loadRes fails on an empty list
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and its table
        gt = COCO()
        gt.dataset = _ground_truth_for_eval(ground_truth)
        gt.createIndex()
        detections = gt.loadRes([dict(r) for r in results])  # loadRes writes into each result
        evaluation = COCOeval(gt, detections, iouType="bbox")
        if category_ids is not None:
            evaluation.params.catIds = sorted(set(category_ids))
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # COCOeval's -1 marks "no ground truth to score" (e.g. a selection whose boxes are all crowd regions).
    return {key: math.nan if value < 0 else float(value)
            for key, value in zip(("ap", "ap50", "ap75"), evaluation.stats[:3], strict=True)}


def detections_to_results(image_id: int, boxes_xywh: np.ndarray, scores: np.ndarray, category_ids: np.ndarray
                          ) -> list[dict]:
    """COCO results ({image_id, category_id, bbox [x, y, w, h], score}, plain Python numbers) of one image's
    detections: pixel boxes [n, 4] of the original image, scores [n] and COCO category ids [n]."""
    boxes_xywh = np.asarray(boxes_xywh, np.float64).reshape(-1, 4)
    image_id = image_id.item() if isinstance(image_id, np.generic) else image_id  # numpy integers are not JSON
    return [{"image_id": image_id, "category_id": int(category_id), "bbox": [float(v) for v in box],
             "score": float(score)}
            for box, score, category_id in zip(boxes_xywh, np.asarray(scores), np.asarray(category_ids), strict=True)]


def write_coco_results(path: epath.PathLike, results: list[dict]) -> None:
    """Writes COCO results (as `detections_to_results` makes) as a JSON list, atomically."""
    write_atomic(path, json.dumps(results))


def write_coco_annotations(path: epath.PathLike, images: list[dict], boxes: list[np.ndarray],
                           classes: list[np.ndarray], category_names: list[str]) -> None:
    """Writes a COCO instances JSON, atomically: `images` ({id, file_name, width, height} each), and for each image
    its pixel xyxy boxes [n, 4] and class indices [n] into `category_names`, whose category ids are 1..C.
    Annotation ids count from 1 (COCOeval takes id 0 for "unmatched"), area is the box's, iscrowd 0."""
    if not len(images) == len(boxes) == len(classes):
        raise ValueError(f"need as many images, box arrays and class arrays, got {len(images)}, {len(boxes)}, "
                         f"{len(classes)}")
    annotations = []
    for image, image_boxes, image_classes in zip(images, boxes, classes, strict=True):
        image_boxes = np.asarray(image_boxes, np.float64).reshape(-1, 4)
        image_classes = np.asarray(image_classes).reshape(-1)
        if len(image_boxes) != len(image_classes) or np.any((image_classes < 0)
                                                             | (image_classes >= len(category_names))):
            raise ValueError(f"image {image['id']}: need one class index in [0, {len(category_names)}) per box, got "
                             f"{image_classes.tolist()} for {len(image_boxes)} boxes")
        for (x0, y0, x1, y1), class_index in zip(image_boxes.tolist(), image_classes.tolist(), strict=True):
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": class_index + 1,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(category_names)]
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"images": list(images), "annotations": annotations, "categories": categories}))


def write_detection_folder(root: epath.PathLike, split: str, images: list[np.ndarray], boxes_px_xyxy: list[np.ndarray],
                           classes: list[np.ndarray], category_names: Sequence[str]) -> epath.Path:
    """Writes images (uint8 [H, W, 3], sizes may differ) as root/images/<split>/000000.png, ... (image ids 1, 2,
    ...) and their pixel xyxy boxes and class indices as root/annotations/instances_<split>.json
    (`write_coco_annotations`); returns the annotation file's path. `CocoDetection(that path,
    root/images/<split>, ...)` reads it back."""
    root = epath.Path(root)
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image {i}: need uint8 [H, W, 3], got {image.dtype} {image.shape}")
        file_name = f"{i:06d}.png"
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        write_atomic(image_dir / file_name, buffer.getvalue())
        entries.append({"id": i + 1, "file_name": file_name, "width": image.shape[1], "height": image.shape[0]})
    path = root / "annotations" / f"instances_{split}.json"
    write_coco_annotations(path, entries, boxes_px_xyxy, classes, list(category_names))
    return path
