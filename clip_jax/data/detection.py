"""Detection data of the open-vocabulary methods (ViLD, GLIP): images with boxes named by class, from `shapes` scenes
or a COCO-format file, and the per-example targets the methods train on.

Boxes are normalised xyxy in the model's square input image (models/boxes.py). A COCO set is read through
data/coco.py (resized and centre-cropped like every evaluation image; a box the crop cuts away is dropped), so its
evaluation here is in the cropped frame; `coco.to_original_xywh` maps predictions back for a results file.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import ml_collections
import numpy as np
from PIL import Image

from clip_jax.data.coco import CocoDetection, annotation_summary
from clip_jax.data.shapes import ShapesConfig, ShapesDataset, class_names, scene_boxes
from clip_jax.data.tokenizer import ClipTokenizer
from clip_jax.errors import ConfigError, quoted
from clip_jax.models.boxes import box_iou, cxcywh_to_xyxy, xyxy_to_cxcywh


@dataclasses.dataclass
class DetectionSet:
    """N images uint8 [N, S, S, 3], each with boxes float32 [n_i, 4] (normalised xyxy) and classes int32 [n_i]
    (indices into `names`)."""

    images: np.ndarray
    boxes: list[np.ndarray]
    classes: list[np.ndarray]
    names: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def ground_truth(self) -> dict:
        """The set as a COCO instances dict in the model image's pixels (category id = class index + 1, image id =
        position + 1): what COCOeval scores predictions against."""
        size = self.images.shape[1]
        images = [{"id": i + 1, "file_name": f"{i:06d}.png", "width": size, "height": size} for i in range(len(self))]
        annotations = []
        for i, (boxes, classes) in enumerate(zip(self.boxes, self.classes, strict=True)):
            for box, c in zip(boxes * size, classes, strict=True):
                w, h = float(box[2] - box[0]), float(box[3] - box[1])
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(c) + 1,
                                    "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h, "iscrowd": 0})
        categories = [{"id": c + 1, "name": n} for c, n in enumerate(self.names)]
        return {"images": images, "annotations": annotations, "categories": categories}


@functools.lru_cache(maxsize=8)
def _shapes_set(shapes: ShapesConfig, split: str, n: int) -> DetectionSet:
    source = ShapesDataset(shapes, split)
    size = shapes.image_size
    images, boxes, classes = [], [], []
    for i in range(n):
        scene = source.scene(i)
        images.append(source.image(i))
        pixel_boxes, scene_classes = scene_boxes(scene, size)
        boxes.append(pixel_boxes / size)
        classes.append(scene_classes)
    return DetectionSet(np.stack(images), boxes, classes, class_names())


def shapes_detection_set(config: ml_collections.ConfigDict, split: str, n: int, objects: tuple[int, int]
                         ) -> DetectionSet:
    """The first n scenes of a shapes split of the run's shapes settings with `objects` (min, max) objects each,
    rendered once per process. `train` and `val` scenes hold seen pairs only; `test_novel` scenes hold a held-out
    pair as any one object among seen ones."""
    from clip_jax.data.pipeline import shapes_config  # the pipeline imports the methods' data modules

    shapes = dataclasses.replace(shapes_config(config), min_objects=objects[0], max_objects=objects[1])
    return _shapes_set(shapes, split, n)


def coco_detection_set(annotations: str, image_root: str, image_size: int, n: int | None = None,
                       source: CocoDetection | None = None) -> DetectionSet:
    """The first n images (all by default) of a COCO instances file, resized and centre-cropped to image_size;
    from `source`, that file already read, when given."""
    source = source or CocoDetection(annotations, image_root, image_size)
    count = len(source) if n is None else min(n, len(source))
    items = [source[i] for i in range(count)]
    return DetectionSet(np.stack([it["image"] for it in items]) if items else np.zeros((0, image_size, image_size, 3),
                                                                                    np.uint8),
                        [it["boxes"] for it in items], [it["classes"] for it in items], list(source.category_names))


def category_names(annotations: str) -> list[str]:
    """A COCO file's category names in the order of their ids (data/coco.py's class indices)."""
    # Read as the COCO reader does: a file that is not JSON, or is truncated, is a one-line error, not a traceback.
    categories = annotation_summary(annotations).categories
    return [c["name"] for c in sorted(categories, key=lambda c: c["id"])]


# --- per-example targets -----------------------------------------------------------------------------------------
def patch_targets(boxes: np.ndarray, classes: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Each object assigned to the patch holding its box centre (the one-stage detectors' simplest assignment; on
    shapes no two objects share a patch): (patch boxes float32 [grid * grid, 4] normalised xyxy, zeros where no
    object is assigned; patch classes int32 [grid * grid], -1 where none). Where two centres fall in one patch the
    smaller box keeps it (FCOS's rule)."""
    patch_boxes = np.zeros((grid * grid, 4), np.float32)
    patch_classes = np.full(grid * grid, -1, np.int32)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for i in np.argsort(-area):  # larger first: a smaller box overwrites it
        cx, cy = (boxes[i, 0] + boxes[i, 2]) / 2, (boxes[i, 1] + boxes[i, 3]) / 2
        col, row = min(int(cx * grid), grid - 1), min(int(cy * grid), grid - 1)
        patch_boxes[row * grid + col] = boxes[i]
        patch_classes[row * grid + col] = classes[i]
    return patch_boxes, patch_classes


def _jitter(box: np.ndarray, rng: np.random.Generator, iou_range: tuple[float, float], tries: int = 20
            ) -> np.ndarray:
    """A box near `box` (shifted by up to 25% of its size, each side scaled by 0.7-1.4) whose IoU with it lies in
    iou_range; `box` itself when no draw does."""
    cx, cy, w, h = xyxy_to_cxcywh(box)
    for _ in range(tries):
        dx, dy = rng.uniform(-0.25, 0.25, 2)
        sw, sh = np.exp(rng.uniform(np.log(0.7), np.log(1.4), 2))
        candidate = np.clip(np.asarray(cxcywh_to_xyxy(np.array([cx + dx * w, cy + dy * h, w * sw, h * sh]))), 0, 1)
        iou = float(box_iou(candidate[None], box[None])[0, 0])
        if iou_range[0] <= iou <= iou_range[1]:
            return candidate.astype(np.float32)
    return box.astype(np.float32)


def sample_regions(boxes: np.ndarray, classes: np.ndarray, rng: np.random.Generator, num_regions: int,
                   foreground: float = 0.5, iou_range: tuple[float, float] = (0.5, 0.95)
                   ) -> tuple[np.ndarray, np.ndarray]:
    """`num_regions` regions of an image to classify and distil (ViLD's RoIs, here drawn from the ground truth as
    METHODS.md 11.5 suggests in place of an RPN): a `foreground` fraction jittered around the objects (IoU with
    their object in iou_range), the rest random boxes (sides 5-60% of the image). Each takes the class of the object
    it overlaps at IoU >= 0.5, else -1 (background). (regions float32 [R, 4] normalised xyxy, classes int32 [R])."""
    n_fg = int(round(num_regions * foreground)) if len(boxes) else 0
    regions = [_jitter(boxes[rng.integers(len(boxes))], rng, iou_range) for _ in range(n_fg)]
    for _ in range(num_regions - n_fg):
        w, h = rng.uniform(0.05, 0.6, 2)
        x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
        regions.append(np.array([x0, y0, x0 + w, y0 + h], np.float32))
    regions = np.stack(regions).astype(np.float32)
    labels = np.full(num_regions, -1, np.int32)
    if len(boxes):
        iou = np.asarray(box_iou(regions, boxes))
        best = iou.argmax(axis=1)
        matched = iou[np.arange(num_regions), best] >= 0.5
        labels[matched] = classes[best[matched]]
    return regions, labels


def crop_regions(image: np.ndarray, boxes: np.ndarray, size: int, scales: Sequence[float] = (1.0, 1.5)
                 ) -> np.ndarray:
    """uint8 [R, len(scales), size, size, 3]: each box (normalised xyxy) of the image, enlarged about its centre by
    each scale (ViLD's 1x and 1.5x crops), cut to the image, resized to size x size (bicubic): what a CLIP sees of a
    region (the teacher of ViLD-image, and the CLIP-on-crops baseline)."""
    pil = Image.fromarray(image)
    h, w = image.shape[:2]
    out = np.zeros((len(boxes), len(scales), size, size, 3), np.uint8)
    for r, box in enumerate(boxes):
        cx, cy, bw, bh = xyxy_to_cxcywh(np.asarray(box, np.float64))
        for s, scale in enumerate(scales):
            x0, y0, x1, y1 = np.clip(cxcywh_to_xyxy(np.array([cx, cy, bw * scale, bh * scale])), 0, 1)
            # At least one pixel, kept inside the image, so a degenerate box still gives an image.
            x0, y0 = min(x0, 1 - 1 / w), min(y0, 1 - 1 / h)
            x1, y1 = max(x1, x0 + 1 / w), max(y1, y0 + 1 / h)
            out[r, s] = np.asarray(pil.resize((size, size), Image.BICUBIC, box=(x0 * w, y0 * h, x1 * w, y1 * h)))
    return out


# --- grounding prompts (GLIP) --------------------------------------------------------------------------------------
def grounding_prompt(tokenizer: ClipTokenizer, phrases: Sequence[str], context_length: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """A detection prompt: the phrases joined by ". " and ended by "." (GLIP's "person. bicycle. car."), tokenized:
    (ids int32 [context_length], the position of each phrase's last token int32 [K]). With a causal text tower the
    last token is the one whose feature has read the whole phrase (methods/glip.py). Positions come from tokenizing
    each prefix, so they are exact for any BPE vocabulary and phrases that do not end in punctuation (which would
    merge with the separator). ValueError if the prompt does not fit, or a phrase holds the separator, '.'."""
    bad = [p for p in phrases if "." in p or not p.strip()]
    if bad:
        raise ValueError(f"phrases must be non-empty and hold no '.' (it separates them), got {bad}")
    ends = []
    for k in range(len(phrases)):
        ends.append(len(tokenizer.encode(". ".join(phrases[: k + 1]))))  # SOT sits at 0: the last id's position
    text = ". ".join(phrases) + "."
    ids, lengths = tokenizer.tokenize_with_lengths([text], context_length)
    if lengths[0] > context_length - 2:
        raise ValueError(f"the prompt {text!r} has {lengths[0]} tokens; the text tower takes {context_length - 2}")
    return ids[0], np.asarray(ends, np.int32)


def prompt_chunks(tokenizer: ClipTokenizer, names: Sequence[str], context_length: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The class names packed greedily, in order, into as few prompts as fit the context (GLIP splits LVIS's 1,203
    names the same way): (tokens int32 [P, T], phrase ends int32 [P, K], class index int32 [P, K], -1 where a
    prompt has fewer than K phrases; their ends point at position 0)."""
    chunks: list[list[int]] = []
    for c, name in enumerate(names):
        if chunks:
            try:
                grounding_prompt(tokenizer, [names[i] for i in chunks[-1]] + [name], context_length)
                chunks[-1].append(c)
                continue
            except ValueError:
                pass
        try:
            grounding_prompt(tokenizer, [name], context_length)
        except ValueError:
            # One short line: grounding_prompt's message quotes the whole prompt, and with it the name, whole (a
            # name of a thousand characters made a message of 2,000 saying it twice).
            if "." in name or not name.strip():
                raise ConfigError(f"the name {quoted(name)} is empty or holds '.', which separates the phrases of "
                                  "the detector's prompt: write it without one") from None
            count = len(tokenizer.encode(name + "."))
            raise ConfigError(f"the name {quoted(name)} alone has {count} tokens with its '.', and the text tower "
                              f"reads {context_length - 2}: shorten it") from None
        chunks.append([c])
    k = max(len(chunk) for chunk in chunks) if chunks else 0
    tokens = np.zeros((len(chunks), context_length), np.int32)
    ends = np.zeros((len(chunks), k), np.int32)
    classes = np.full((len(chunks), k), -1, np.int32)
    for p, chunk in enumerate(chunks):
        tokens[p], chunk_ends = grounding_prompt(tokenizer, [names[i] for i in chunk], context_length)
        ends[p, : len(chunk)] = chunk_ends
        classes[p, : len(chunk)] = chunk
    return tokens, ends, classes


def region_crop_embeddings(encode_images, images: np.ndarray, boxes: np.ndarray, size: int,
                           scales: Sequence[float] = (1.0, 1.5), images_per_call: int = 32) -> np.ndarray:
    """float32 [N, R, D]: a CLIP's embedding of each region crop (`crop_regions` at each scale, the scales'
    normalised embeddings averaged and renormalised: ViLD's 1x + 1.5x ensemble). `encode_images(uint8 [M, S, S, 3])`
    returns normalised [M, D]; images [N, S, S, 3], boxes [N, R, 4] normalised xyxy. Crops are made and encoded
    `images_per_call` images at a time, so memory stays flat on any N."""
    out = []
    for start in range(0, len(images), images_per_call):
        crops = np.stack([crop_regions(img, b, size, scales) for img, b in
                          zip(images[start:start + images_per_call], boxes[start:start + images_per_call],
                              strict=True)])
        n, r, s = crops.shape[:3]
        emb = np.asarray(encode_images(crops.reshape(n * r * s, size, size, 3)), np.float32).reshape(n, r, s, -1)
        mean = emb.mean(axis=2)
        out.append(mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12))
    return np.concatenate(out) if out else np.zeros((0, boxes.shape[1], 0), np.float32)
