"""Semantic segmentation data in the PASCAL VOC layout, for evaluating dense (per-pixel) zero-shot methods:

    root/JPEGImages/<id>.jpg                      the images
    root/SegmentationClass/<id>.png               their label maps, one label index per pixel (255: void)
    root/ImageSets/Segmentation/<split>.txt       the ids of a split, one a line
    root/class_names.txt                          optional: line i names label i, line 0 the background

`SegmentationFolder` reads it as a random-access source; without class_names.txt the labels are VOC's 21 classes
(`VOC_CLASSES`). Every problem with a file is a `SegmentationError` of one line naming it: a mask is never repaired
or skipped, since a wrong label map silently changes every score computed from it.

`write_segmentation_folder` writes the layout; `write_shapes_segmentation_set` fills it with procedural shapes
scenes and their class maps, so that the real-data path can be run (in tests, in the docs) without VOC itself.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Sequence

import numpy as np
from etils import epath
from PIL import Image, UnidentifiedImageError

from clip_jax.data.captions import decode_text, text_lines
from clip_jax.data.images import (
    DEFAULT_MAX_IMAGE_BYTES,
    RefusedFile,
    bad_image_reason,
    decode_image,
    read_image_file,
    resize_center_crop,
)
from clip_jax.data.shapes import ShapesConfig, ShapesDataset, class_names
from clip_jax.data.tokenizer import READS_ALIKE, same_text
from clip_jax.errors import ConfigError, one_line
from clip_jax.files import is_remote

log = logging.getLogger(__name__)


class SegmentationError(ConfigError):
    """A segmentation folder or file that cannot be used, in one line naming the file, the problem and what to do.
    A ConfigError (so a ValueError), so that the command line reports it as one line, like any bad input."""


IGNORE = 255  # VOC's "void" label (object borders, ambiguous pixels): scored as no class
BACKGROUND = "background"  # label 0's name, and the prompt of the background when it is a label of its own
# The 21 PASCAL VOC classes in label order. VOC's own spellings "diningtable", "pottedplant" and "tvmonitor" are
# written as words, as CLIP prompt lists commonly do: the names go into prompts ("a photo of a dining table"),
# and a tokeniser splits a run-together word into pieces the text encoder rarely saw together.
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor",
)  # fmt: skip

_IMAGES, _MASKS, _SPLITS, _NAMES = "JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "class_names.txt"
_MASK_MODES = ("P", "L")  # modes whose pixel values are the label indices themselves
_LAYOUT = "root/JPEGImages/<id>.jpg, root/SegmentationClass/<id>.png, root/ImageSets/Segmentation/<split>.txt"


def voc_palette() -> np.ndarray:
    """VOC's colour map, uint8 [256, 3]: label i's colour takes bit 3k (red), 3k+1 (green), 3k+2 (blue) of i as bit
    7-k of its channel, so the first labels get the most distinct colours (1 dark red, 2 dark green, 255 the void
    border's cream (224, 224, 192))."""
    labels = np.arange(256)
    palette = np.zeros((256, 3), np.int64)
    for k in range(8):
        for channel in range(3):
            palette[:, channel] |= ((labels >> (3 * k + channel)) & 1) << (7 - k)
    return palette.astype(np.uint8)


def _decode_problem(error: BaseException) -> str:
    """Why PIL could not decode a file, in one line: its reason (`bad_image_reason`) and its error, except for a
    file of no image format, whose message would name only the in-memory buffer."""
    if isinstance(error, UnidentifiedImageError):
        return "undecodable_image: not in any image format PIL recognises"
    return f"{bad_image_reason(error)}: {one_line(error)}"


def _read_bytes(path: epath.PathLike, what: str, max_bytes: int) -> bytes:
    """The bytes of an image or mask file through the project's one bounded reader (a FIFO or device is refused
    without blocking, a file over the cap without being read), every failure a SegmentationError."""
    try:
        return read_image_file(path, max_bytes)
    except RefusedFile as e:
        raise SegmentationError(f"{what} {e}; replace it with an image file or raise max_image_bytes") from None
    except FileNotFoundError:
        raise SegmentationError(f"{what} {path} does not exist; add it or remove its id from the split file") from None
    except OSError as e:
        raise SegmentationError(f"cannot read {what} {path}: {e.strerror or e}") from None


def _decode_image(path: epath.PathLike, max_bytes: int) -> np.ndarray:
    data = _read_bytes(path, "image", max_bytes)
    try:
        return decode_image(data)[0]  # at full size (no JPEG draft scaling): the mask is checked against it
    except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt data
        raise SegmentationError(f"cannot decode image {path} ({_decode_problem(e)}); re-export it or remove its id "
                                "from the split file") from None


def _decode_mask(path: epath.PathLike, max_bytes: int) -> np.ndarray:
    """The label indices of a mask PNG, uint8 [H, W]. Only palette and greyscale images hold indices: an RGB mask
    holds VOC's colours, which this reader does not map back (a colour off the palette would need a guess)."""
    data = _read_bytes(path, "mask", max_bytes)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = img.mode
            labels = np.asarray(img, dtype=np.uint8) if mode in _MASK_MODES else None
    except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt data
        raise SegmentationError(f"cannot decode mask {path} ({_decode_problem(e)}); re-export it as a palette PNG of "
                                "label indices") from None
    if labels is None:
        hint = "convert to palette indices" if mode in ("RGB", "RGBA") else "save it as a palette (P) or 'L' PNG"
        raise SegmentationError(f"mask {path} has mode {mode}, not label indices; {hint} (a palette or greyscale "
                                "PNG whose pixel values are the labels)")
    return labels


def _check_labels(labels: np.ndarray, num_classes: int, path: epath.PathLike) -> None:
    present = np.unique(labels)
    bad = present[(present >= num_classes) & (present != IGNORE)]
    if len(bad):
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        raise SegmentationError(f"mask {path} holds label {shown}, beyond the {num_classes} classes (0-"
                                f"{num_classes - 1}, and {IGNORE} for void); fix the mask or name every class in "
                                f"{_NAMES}")


def _read_ids(path: epath.Path) -> list[str]:
    try:
        text = decode_text(path.read_bytes())
    except FileNotFoundError:
        folder = path.parent
        have = sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []
        raise SegmentationError(f"split file {path} does not exist (splits there: {have or 'none'}); give a split "
                                f"of the folder, laid out as {_LAYOUT}") from None
    except OSError as e:
        raise SegmentationError(f"cannot read split file {path}: {e.strerror or e}") from None
    ids = [line.strip() for line in text_lines(text) if line.strip()]
    if not ids:
        raise SegmentationError(f"split file {path} lists no id; write one image id a line")
    return ids


_VOC_NAMES_TOLD: set[str] = set()  # the folders already told they are read with VOC's names (once a process)


def _read_class_names(path: epath.Path) -> list[str]:
    """Names by label from `path` if it exists, else VOC's. Trailing blank lines are dropped; a blank line before
    a name is refused, since it would shift every later label."""
    if not path.exists():
        if str(path) not in _VOC_NAMES_TOLD:  # a folder of other classes would silently train under VOC's names
            _VOC_NAMES_TOLD.add(str(path))
            log.warning("%s has no %s: its labels 0-%d are read as PASCAL VOC's classes (background, %s, ...); if "
                        "they are others, write their names there, one a line, the first the background",
                        path.parent, _NAMES, len(VOC_CLASSES) - 1, ", ".join(VOC_CLASSES[1:4]))
        return list(VOC_CLASSES)
    try:
        lines = [line.strip() for line in text_lines(decode_text(path.read_bytes()))]
    except OSError as e:
        raise SegmentationError(f"cannot read class names {path}: {e.strerror or e}") from None
    while lines and not lines[-1]:
        lines.pop()
    if "" in lines:
        raise SegmentationError(f"{path}, line {lines.index('') + 1} is blank; line i names label i, so give every "
                                "label a name")
    if not 2 <= len(lines) <= IGNORE:
        raise SegmentationError(f"{path} names {len(lines)} classes; give the background (line 1) and 1 to "
                                f"{IGNORE - 1} classes (label {IGNORE} is void)")
    if pair := same_text(lines):  # two labels of one prompt: the second could never be predicted
        earlier, later = pair
        raise SegmentationError(f"{path}, lines {earlier + 1} and {later + 1}: {lines[earlier]!r} and {lines[later]!r} "
                                f"are one text to CLIP ({READS_ALIKE}); give each class a name of its own")
    return lines


def folder_class_names(root: epath.PathLike) -> list[str]:
    """The class names of a folder in the VOC layout (its class_names.txt, else VOC's), index 0 the background."""
    return _read_class_names(epath.Path(root) / _NAMES)


class SegmentationFolder:
    """Random-access source of (image, label map) pairs of one split of a folder in the VOC layout (see the module
    docstring). Both are resized so that the shorter side is `image_size` and centre-cropped, the image bicubic
    and the mask nearest (no invented label), with the same crop box."""

    def __init__(self, root: epath.PathLike, split: str, image_size: int,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.root, self.split, self.image_size = epath.Path(root), split, image_size
        self.max_image_bytes = max_image_bytes
        self.ids = _read_ids(self.root / _SPLITS / f"{split}.txt")
        self._names = folder_class_names(self.root)
        if not is_remote(os.fspath(self.root)):  # a stat per file is cheap here; on an object store, a request each
            self._check_files_exist()

    def _check_files_exist(self) -> None:
        """Before any decoding, so that a missing file stops an evaluation at its start, not an hour in."""
        for what, paths in (("image", map(self.image_path, self.ids)), ("mask", map(self.mask_path, self.ids))):
            absent = [p for p in paths if not os.path.isfile(p)]
            if absent:
                others = sorted(q.name for q in absent[0].parent.glob(f"{absent[0].stem}.*"))  # images saved as PNG
                named = f"; {absent[0].parent} has {', '.join(others[:3])}: the layout names it {absent[0].name}" \
                    if others else ""
                raise SegmentationError(f"{what} {absent[0]} does not exist (missing: {len(absent)} of the "
                                        f"{len(self.ids)} {what}s of split {self.split!r}){named}; add them or remove "
                                        f"their ids from {self.root / _SPLITS / f'{self.split}.txt'}")

    def image_path(self, image_id: str) -> epath.Path:
        return self.root / _IMAGES / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> epath.Path:
        return self.root / _MASKS / f"{image_id}.png"

    def class_names(self) -> list[str]:
        """Names by label, index 0 the background."""
        return list(self._names)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        """{"image": uint8 [S, S, 3], "seg": uint8 [S, S] of labels (IGNORE for void), "id": str}."""
        image_id = self.ids[index]
        image_path, mask_path = self.image_path(image_id), self.mask_path(image_id)
        image = _decode_image(image_path, self.max_image_bytes)
        labels = _decode_mask(mask_path, self.max_image_bytes)
        if labels.shape != image.shape[:2]:
            (h, w), (ih, iw) = labels.shape, image.shape[:2]
            raise SegmentationError(f"mask {mask_path} is {w}x{h} but its image {image_path} is {iw}x{ih}; a mask "
                                    "must have its image's size")
        _check_labels(labels, len(self._names), mask_path)  # at full size: a resize may drop a stray pixel
        return {"image": resize_center_crop(image, self.image_size),
                "seg": resize_center_crop(labels, self.image_size, Image.NEAREST), "id": image_id}

    def arrays(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 [N, S, S, 3], label maps uint8 [N, S, S]) of the split's first n examples (all by default),
        for evaluation."""
        examples = [self[i] for i in range(len(self) if n is None else min(n, len(self)))]
        if not examples:
            raise ValueError(f"arrays(n={n}) selects no example of {self.root}, split {self.split!r}")
        return np.stack([e["image"] for e in examples]), np.stack([e["seg"] for e in examples])


_ID = re.compile(r"[^\s/\\]+")


def _check_writable(images: Sequence[np.ndarray], segs: Sequence[np.ndarray], ids: Sequence[str],
                    num_classes: int) -> None:
    if not len(images) == len(segs) == len(ids) or not len(ids):
        raise ValueError(f"need as many images, masks and ids (at least one), got {len(images)}, {len(segs)}, "
                         f"{len(ids)}")
    if not 2 <= num_classes <= IGNORE:
        raise ValueError(f"need 2 to {IGNORE} class names (the background first), got {num_classes}")
    if len(set(ids)) != len(ids) or not all(_ID.fullmatch(i) and i not in (".", "..") for i in ids):
        raise ValueError("ids must be unique file names without spaces or slashes")
    for image, seg, image_id in zip(images, segs, ids, strict=True):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or seg.shape != image.shape[:2]:
            raise ValueError(f"{image_id}: need a uint8 [H, W, 3] image and an [H, W] mask, got {image.dtype} "
                             f"{image.shape} and {seg.shape}")
        bad = np.unique(seg[(seg < 0) | (seg >= num_classes) & (seg != IGNORE)])
        if len(bad):
            raise ValueError(f"{image_id}: mask labels {bad.tolist()} are beyond the {num_classes} classes")


def mask_png(labels: np.ndarray) -> bytes:
    """A label map (integer [H, W], values < 256) as a palette PNG in VOC's colours: the values are the palette
    indices, so it reads back as the labels and views as a picture."""
    mask = Image.fromarray(np.asarray(labels).astype(np.uint8)).convert("P")  # "L" to "P" keeps the values
    mask.putpalette(voc_palette().tobytes())
    buffer = io.BytesIO()
    mask.save(buffer, "PNG")
    return buffer.getvalue()


def write_segmentation_folder(out_dir: epath.PathLike, images: Sequence[np.ndarray], segs: Sequence[np.ndarray],
                              ids: Sequence[str], class_names: Sequence[str], split: str) -> epath.Path:
    """Writes images (uint8 [H, W, 3], sizes may differ) and their label maps (integer [H, W]) in the VOC layout
    that `SegmentationFolder` reads, with `split`'s id list and class_names.txt; returns the root. Images are JPEG
    at quality 100 without chroma subsampling (VOC's format; the pixels then differ by a few levels, most at colour
    edges), masks palette PNGs in VOC's colours (lossless, and viewable as a picture). Another split written to the
    same folder keeps the first one's files."""
    images, segs = [np.asarray(i) for i in images], [np.asarray(s) for s in segs]
    _check_writable(images, segs, list(ids), len(class_names))
    out = epath.Path(out_dir)
    for folder in (_IMAGES, _MASKS, _SPLITS):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for image, seg, image_id in zip(images, segs, ids, strict=True):
        with (out / _IMAGES / f"{image_id}.jpg").open("wb") as f:
            Image.fromarray(image).save(f, "JPEG", quality=100, subsampling=0)
        (out / _MASKS / f"{image_id}.png").write_bytes(mask_png(seg))
    (out / _SPLITS / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    (out / _NAMES).write_text("".join(f"{name}\n" for name in class_names))
    return out


def write_shapes_segmentation_set(out_dir: epath.PathLike, num_examples: int, split: str = "test_novel",
                                  seed: int = 0, image_size: int = 96, min_objects: int = 3, max_objects: int = 6
                                  ) -> epath.Path:
    """Writes the first `num_examples` scenes of the shapes `split` (clean domain) with their class maps
    (`ShapesDataset.masks`: 0 background, 1 + the colour-shape class index) in the VOC layout, with the 49 names
    "background" + shapes `class_names()`; ids are "<split>_<i:06d>". Returns the root, for `SegmentationFolder`.
    "test_novel" by default: its held-out pairs may be any object, so every scene has novel classes to segment."""
    if num_examples < 1:
        raise ValueError(f"num_examples must be positive, got {num_examples}")
    config = ShapesConfig(image_size=image_size, min_objects=min_objects, max_objects=max_objects, seed=seed)
    dataset = ShapesDataset(config, split)
    indices = range(num_examples)
    return write_segmentation_folder(out_dir, [dataset.image(i) for i in indices],
                                     [dataset.masks(i)[0] for i in indices], [f"{split}_{i:06d}" for i in indices],
                                     ["background", *class_names()], split)
