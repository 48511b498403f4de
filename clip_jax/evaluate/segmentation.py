"""Semantic segmentation with text-named labels (`config.evals` entries, registered in suite.py).

Every model answers through its `dense_logits(images, labels)` (a method's dense predict function: the plain CLIP's
training-free patch scores, LSeg's decoder, GroupViT's segments), upsampled to the image and soft-maxed over the
labels by `Encoder.segment`. The background is either a label of its own (`background = "label"`: the prompt
"background" among the class names, what LSeg trains with) or every pixel whose best class is less probable than a
threshold (`background = "threshold"`: GroupViT's rule), the threshold chosen on the `val` split, never on a test
split (the reference recipes choose on test: METHODS.md 9.4, 10.4).

- `shapes_segmentation`: `shapes` scenes with their exact masks (data/shapes.py::scene_masks), the label set the
  background and all 48 colour-shape pairs. Keys: `<name>_seen_miou` (test_seen scenes: background and seen pairs),
  `<name>_novel_miou` (test_novel scenes: the held-out pairs, never named in training, as any object),
  `<name>_novel_scenes_miou` (test_novel scenes, every class), `<name>_iou/<class>` for the background and each
  held-out pair, and `<name>_threshold`.
- `segmentation_folder`: a folder in the PASCAL VOC layout (data/segmentation.py; 255 = ignored), its class names
  (line 0 the background), `<name>_miou` and `<name>_iou/<class>`; with `novel` class names, `<name>_seen_miou` and
  `<name>_novel_miou` too.

mIoU is the mean over classes of intersection / union of the pixel sets, from the confusion matrix summed over the
whole split (not per image), over the classes that occur in the ground truth or the prediction (a class with an
empty union has no IoU), as mmsegmentation and the VOC benchmark count it. `overlay_dir` writes each split's first
`overlays` images with their predicted and true masks as PNGs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from clip_jax.data.classification import class_embeddings
from clip_jax.data.pipeline import get_source
from clip_jax.data.segmentation import BACKGROUND, IGNORE, SegmentationFolder, voc_palette
from clip_jax.data.shapes import ZERO_SHOT_TEMPLATES
from clip_jax.errors import ConfigError
from clip_jax.evaluate import trained_on_shapes
from clip_jax.files import refuse_run_files

BACKGROUND_MODES = ("label", "threshold")
# Candidate thresholds on the best class's probability, tried on `val`.
THRESHOLDS = tuple(np.round(np.arange(0.05, 1.0, 0.05), 2))


def confusion_matrix(target: np.ndarray, pred: np.ndarray, num_classes: int, ignore: int = IGNORE) -> np.ndarray:
    """int64 [C, C] pixel counts, row = true class, column = predicted class; pixels labelled `ignore` are left
    out. Labels must lie in [0, C) (or be `ignore`)."""
    target, pred = np.asarray(target).ravel(), np.asarray(pred).ravel()
    keep = target != ignore
    target, pred = target[keep].astype(np.int64), pred[keep].astype(np.int64)
    if target.size and (target.max() >= num_classes or pred.max() >= num_classes or min(target.min(), pred.min()) < 0):
        raise ValueError(f"labels must lie in [0, {num_classes}) or be {ignore}")
    return np.bincount(target * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def class_iou(confusion: np.ndarray) -> np.ndarray:
    """float64 [C]: intersection / union per class; NaN for a class absent from both the truth and the
    prediction."""
    intersection = np.diag(confusion).astype(np.float64)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / np.maximum(union, 1), np.nan)


def mean_iou(confusion: np.ndarray, classes: Sequence[int] | None = None) -> float:
    """The mean IoU over `classes` (default: all) that have one; NaN if none has."""
    iou = class_iou(confusion)
    iou = iou if classes is None else iou[np.asarray(classes, np.int64)]
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def predict_labels(label: np.ndarray, probability: np.ndarray, threshold: float | None) -> np.ndarray:
    """Class maps from `Encoder.segment`'s outputs. With a threshold the labels are the classes without the
    background (class k is label k + 1 of the map) and a pixel whose best probability is below it is background
    (0); without, label 0 is the background's own prompt."""
    if threshold is None:
        return label
    return np.where(probability < threshold, 0, label + 1)


def choose_threshold(label: np.ndarray, probability: np.ndarray, target: np.ndarray, num_classes: int,
                     classes: Sequence[int] | None = None) -> float:
    """The candidate of THRESHOLDS with the best mIoU (over `classes`) of the validation predictions."""
    scores = [mean_iou(confusion_matrix(target, predict_labels(label, probability, t), num_classes), classes)
              for t in THRESHOLDS]
    return float(THRESHOLDS[int(np.nanargmax(scores))])


def run_templates(method: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The prompts a run put its labels in when it trained (LSeg's and ViLD's method.templates, GroupViT's
    method.prompt_templates), () for a method without: what its labels are scored with unless told otherwise (an
    LSeg run of the shapes prompts scored 0.51 mIoU with "a photo of a {}." where its own gave 0.82)."""
    for key in ("templates", "prompt_templates"):
        if method.get(key):
            return tuple(method.get(key))
    return ()


def label_embeddings(texts, class_names: Sequence[str], background: str, templates: Sequence[str]) -> np.ndarray:
    """[L, D] embeddings of the label set: the background prompt first when it is a label, then the classes (the
    names of class map values 1..C)."""
    names = ([BACKGROUND] if background == "label" else []) + list(class_names)
    return class_embeddings(texts, names, templates)


@dataclasses.dataclass(frozen=True)
class LabelRequest:
    """What `segment` (the command, and `Model.segment`) asks of a model: its labels' embeddings, the background's
    rule, and the prompts."""

    labels: tuple[str, ...]  # the names of mask values 1..L (0 is the background)
    embeddings: np.ndarray  # [L (+1 for the background's own prompt), D]
    background: str  # "label" (LSeg's own) or "threshold"
    threshold: float | None  # the background's, with background "threshold"
    templates: tuple[str, ...]
    templates_from: str  # where the templates came from, for the report


def segment_templates(method: ml_collections.ConfigDict, given: Sequence[str] | None) -> tuple[tuple[str, ...], str]:
    """(the label prompts of `segment`, where they come from): those given; else the run's own, as its training and
    evaluations used them (LSeg's and ViLD's method.templates, GroupViT's method.prompt_templates); else the shapes
    prompts. Using the shapes prompts always gave masks other than the run's segmentation_folder evaluation."""
    from clip_jax.data.shapes import ZERO_SHOT_TEMPLATES

    if given:
        return tuple(given), "--templates"
    if own := run_templates(method):
        return own, f"the run's method.{'templates' if method.get('templates') else 'prompt_templates'}"
    return tuple(ZERO_SHOT_TEMPLATES), "the shapes prompts"


def _named(python: bool) -> Callable[[str], str]:
    """How a message names an argument: the command's flag (--labels), or the Python argument (labels=)."""
    return (lambda name: f"{name}=") if python else (lambda name: f"--{name}")


def check_labels(labels: Sequence[str], threshold: float | None = None, templates: Sequence[str] | None = None,
                 python: bool = False) -> None:
    """What is wrong with a label set whatever the model (ConfigError, before a model is loaded); `python`: name
    the arguments as `Model.segment`'s, not as the command's flags."""
    from clip_jax.evaluate.classify import check_templates

    named = _named(python)
    if isinstance(labels, str):
        raise TypeError("give a list of labels, not one string")
    if said := next((label for label in labels if label.lower() == BACKGROUND), None):
        raise ConfigError(f"{named('labels')}: {said!r} is the background, label 0, which segment adds itself: leave "
                          "it out")
    if not labels or len(set(labels)) != len(labels):
        raise ConfigError(f"{named('labels')} needs distinct names, got {list(labels)}")
    if len(labels) > 254:
        raise ConfigError(f"{named('labels')}: at most 254 names fit the mask PNGs, got {len(labels)}")
    if threshold is not None and not 0 < threshold < 1:
        raise ConfigError(f"{named('threshold')} must be in (0, 1), got {threshold}")
    if templates:
        check_templates(templates, named("templates"))


def label_request(trained, texts, labels: Sequence[str], background: str | None = None,
                  threshold: float | None = None, templates: Sequence[str] | None = None, python: bool = False
                  ) -> LabelRequest:
    """The request of `labels` to the trained model (`load_trained`'s), `texts` embedding token ids: LSeg's
    background is a label of its own, the others' the pixels whose best label is less probable than `threshold`
    (0.5 unless given). ConfigError for what cannot give the masks asked for (named as the command's flags, or with
    `python` as `Model.segment`'s arguments)."""
    from clip_jax.evaluate.classify import refuse_same_tokens

    named = _named(python)
    labels = list(labels)
    check_labels(labels, threshold, templates, python)
    config = trained.config
    background = background or trained.method.segment_background or "threshold"
    if background not in ("label", "threshold"):
        raise ConfigError(f"{named('background')} must be 'label' or 'threshold', got {background!r}")
    if background == "label" and threshold is not None:
        raise ConfigError(f"{named('threshold')} applies to a background found by threshold, and this run's is a "
                          f"label of its own (LSeg's): give {named('background')}'threshold' to use it"
                          if python else "--threshold applies to a background found by threshold, and this run's "
                          "is a label of its own (LSeg's): add --background threshold to use it")
    if background == "threshold" and len(labels) == 1:  # a softmax over one label is 1 everywhere
        raise ConfigError(f"{named('labels')} {labels[0]!r} alone: this run finds the background by a threshold on "
                          "the softmax over the labels, which one label gets everywhere (every pixel would be it): "
                          "give two or more, e.g. the other things in the images")
    templates, templates_from = segment_templates(config.method, templates)
    # with the background when it is a label: "Background" would be the same text as it
    refuse_same_tokens(named("labels"), [BACKGROUND, *labels] if background == "label" else labels,
                       trained.tokenizer, config.model.text.context_length, templates)
    return LabelRequest(tuple(labels), label_embeddings(texts, labels, background, templates), background,
                        (0.5 if threshold is None else threshold) if background == "threshold" else None, templates,
                        templates_from)


def overlay(image: np.ndarray, classes: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The image with each non-background pixel tinted by its class colour (VOC's, as the mask PNGs); ignored pixels
    white."""
    tint = voc_palette()[classes]
    out = image.astype(np.float32)
    mask = (classes > 0)[..., None]
    out = np.where(mask, (1 - alpha) * out + alpha * tint, out)
    out[classes == IGNORE] = 255
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# The text chunk of every overlay PNG (`write_overlays`): what tells an earlier overlay, which an evaluation may write
# over, from a file of the user's under the same name (a VOC folder's mask val_000.png).
_OVERLAY_MARK = ("Software", "clip_jax segmentation overlay")


def _is_overlay(path: pathlib.Path) -> bool:
    try:
        with Image.open(path) as image:
            return getattr(image, "text", {}).get(_OVERLAY_MARK[0]) == _OVERLAY_MARK[1]
    except (OSError, ValueError):  # not an image, unreadable: not ours
        return False


def check_overlay_dir(name: str, overlay_dir: str, workdir: str | os.PathLike | None = None) -> None:
    """A ConfigError if `evals.<name>.overlay_dir` is where a clip_jax run keeps its files (`files.refuse_run_files`:
    the workdir itself, its checkpoints/ ...; the run's `workdir` counts before a first launch makes it): its PNGs
    would mix with the run's files; or if it holds a file under the names the entry's overlays take
    (`<name>_*.png`) that is no overlay (one with the mark of `write_overlays`): it would be written over. A folder
    of its own inside the run (W/overlays) is fine. Checked with the config and again before writing (a workdir, or
    the files, may have been made there meanwhile)."""
    flag = f"evals.{name}.overlay_dir"
    refuse_run_files(overlay_dir, flag, workdir, is_file=False)
    folder = pathlib.Path(overlay_dir)
    foreign = sorted(p.name for p in folder.glob(f"{name}_*.png") if not _is_overlay(p)) if folder.is_dir() else []
    if foreign:
        raise ConfigError(f"{flag}: {overlay_dir} holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}, "
                          f"which no overlay wrote, under the names this entry's overlays take ({name}_*.png): they "
                          "would be written over; give a folder of the overlays' own")


def write_overlays(out_dir: str | pathlib.Path, images: np.ndarray, preds: np.ndarray, targets: np.ndarray | None,
                   prefix: str) -> list[pathlib.Path]:
    """One PNG per image: the image, its predicted classes over it and, given targets, the true ones, side by
    side."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        panels = [image, overlay(image, preds[i])] + ([overlay(image, targets[i])] if targets is not None else [])
        path = out_dir / f"{prefix}_{i:03d}.png"
        mark = PngInfo()
        mark.add_text(*_OVERLAY_MARK)
        Image.fromarray(np.concatenate(panels, axis=1)).save(path, pnginfo=mark)
        paths.append(path)
    return paths


def _check_background(name: str, background: str) -> None:
    if background not in BACKGROUND_MODES:
        raise ConfigError(f"evals.{name}.background must be one of {', '.join(BACKGROUND_MODES)}, got {background!r}")


# --- shapes ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShapesSegmentationEval:
    every_steps: int | None = None
    num_examples: int | None = None  # scenes per split; None: eval.num_examples
    background: str = "label"  # BACKGROUND_MODES: a prompt of its own, or a threshold chosen on val
    templates: tuple = ZERO_SHOT_TEMPLATES
    overlay_dir: str = ""  # "": no overlays
    overlays: int = 8
    # The scenes' object count, whatever the run trained on: cluttered scenes, where novel pairs are small objects too
    min_objects: int = 3
    max_objects: int = 6


@functools.lru_cache(maxsize=8)
def shapes_segmentation_data(config_json: str, split: str, n: int, objects: tuple[int, int]
                             ) -> tuple[np.ndarray, np.ndarray]:
    """The first n images of a shapes split with `objects` (min, max) objects each and their class maps
    (0 background, 1 + class index), rendered once per process."""
    config = ml_collections.ConfigDict(json.loads(config_json))
    config.data.min_objects, config.data.max_objects = objects
    source = get_source(config, split)
    images = np.stack([source[i]["image"] for i in range(n)])
    masks = np.stack([source.masks(i)[0] for i in range(n)])
    return images, masks


def shapes_predictions(texts, encoder, config: ml_collections.ConfigDict, entry: ShapesSegmentationEval, n: int
                       ) -> tuple[float | None, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """(the background threshold chosen on n `val` scenes, or None with a background label; for test_seen and
    test_novel, their first n images, true class maps and predicted ones) of the model behind `encoder`."""
    source = get_source(config, "test_novel")
    names = source.class_names()
    seen = [0] + [c + 1 for c in source.seen_classes()]
    labels = label_embeddings(texts, names, entry.background, entry.templates)

    def predict(split):
        images, target = shapes_segmentation_data(config.to_json(), split, n, (entry.min_objects, entry.max_objects))
        return images, target, encoder.segment(images, labels)

    threshold = None
    if entry.background == "threshold":
        _, target, (label, prob) = predict("val")
        threshold = choose_threshold(label, prob, target, len(names) + 1, seen)
    out = {}
    for split in ("test_seen", "test_novel"):
        images, target, (label, prob) = predict(split)
        out[split] = images, target, predict_labels(label, prob, threshold)
    return threshold, out


def run_shapes_segmentation(ctx, name: str, entry: ShapesSegmentationEval) -> dict[str, float]:
    config = ctx.config
    if not trained_on_shapes(config, name):
        return {}
    _check_background(name, entry.background)
    source = get_source(config, "test_novel")
    names = source.class_names()
    num_classes = len(names) + 1
    seen = [0] + [c + 1 for c in source.seen_classes()]
    novel = [c + 1 for c in source.held_out_classes()]
    threshold, predictions = shapes_predictions(ctx.texts, ctx.encoder, config, entry, ctx.num_examples(entry))
    results = {} if threshold is None else {f"{name}_threshold": threshold}
    for split, (images, target, pred) in predictions.items():
        confusion = confusion_matrix(target, pred, num_classes)
        if split == "test_seen":
            results[f"{name}_seen_miou"] = mean_iou(confusion, seen)
        else:
            results[f"{name}_novel_miou"] = mean_iou(confusion, novel)
            results[f"{name}_novel_scenes_miou"] = mean_iou(confusion)
            iou = class_iou(confusion)
            for c in [0, *novel]:
                results[f"{name}_iou/{([BACKGROUND] + names)[c]}"] = float(iou[c])
        if entry.overlay_dir:
            check_overlay_dir(name, entry.overlay_dir)
            k = min(entry.overlays, len(images))
            write_overlays(entry.overlay_dir, images[:k], pred[:k], target[:k], f"{name}_{split}")
    return results


# --- a VOC-layout folder ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SegmentationFolderEval:
    path: str = ""  # the folder: JPEGImages/, SegmentationClass/, ImageSets/Segmentation/<split>.txt
    split: str = "val"
    novel: tuple = ()  # class names reported apart (`<name>_novel_miou`): those never labelled in training
    background: str = "label"
    threshold: float = 0.5  # background "threshold": choose it on a split other than the one evaluated
    templates: tuple = ()  # (): the run's own (`run_templates`), else ("a photo of a {}.",)
    num_examples: int | None = None  # None: every image
    every_steps: int | None = None
    overlay_dir: str = ""
    overlays: int = 8


def run_segmentation_folder(ctx, name: str, entry: SegmentationFolderEval) -> dict[str, float]:
    _check_background(name, entry.background)
    source = SegmentationFolder(entry.path, entry.split, ctx.config.model.vision.image_size,
                                ctx.config.data.max_image_bytes)
    names = source.class_names()  # line 0: the background
    unknown = [c for c in entry.novel if c not in names]
    if unknown:
        raise ConfigError(f"evals.{name}.novel names {unknown} that are not classes of {entry.path}")
    images, target = source.arrays(entry.num_examples)
    templates = tuple(entry.templates) or run_templates(ctx.config.method) or ("a photo of a {}.",)
    labels = label_embeddings(ctx.texts, names[1:], entry.background, templates)
    label, prob = ctx.encoder.segment(images, labels)
    threshold = entry.threshold if entry.background == "threshold" else None
    pred = predict_labels(label, prob, threshold)
    confusion = confusion_matrix(target, pred, len(names))
    results = {f"{name}_miou": mean_iou(confusion)}
    if entry.novel:
        novel = [names.index(c) for c in entry.novel]
        results[f"{name}_seen_miou"] = mean_iou(confusion, [c for c in range(len(names)) if c not in novel])
        results[f"{name}_novel_miou"] = mean_iou(confusion, novel)
    results.update({f"{name}_iou/{n}": float(v) for n, v in zip(names, class_iou(confusion), strict=True)})
    if entry.overlay_dir:
        check_overlay_dir(name, entry.overlay_dir)
        k = min(entry.overlays, len(images))
        write_overlays(entry.overlay_dir, images[:k], pred[:k], target[:k], name)
    return results
