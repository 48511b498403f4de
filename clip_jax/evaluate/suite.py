"""The evaluations a run reports, chosen by `config.evals`: a name -> {type, every_steps, ...} entry per
evaluation, resolved through `EVALUATORS` (big_vision's pattern, with an explicit registry). Each evaluator type is a
`Config` dataclass (its fields; `every_steps` None: `eval.every_steps`) and a function from the encoder and the
entry to its results. `eval.batch_size` and `eval.num_examples` are shared by all.

- `shapes`: zero-shot top-1/5 on held-out colour-shape pairs (never in training captions) and on seen pairs, both
  among all pairs, and retrieval R@1/5/10 on test images with their long (distinct) captions. Keys
  `zero_shot_top1`, `zero_shot_top1_seen`, ..., `i2t_r1`, `t2i_r1`, ... Only for a run trained on `shapes` (its
  held-out pairs are defined by the training captions); other runs skip it.
- `shapes_long_text`: retrieval on shapes captions over 77 tokens (`long_*`) and the hard-pairs test
  (`hard_pairs_acc`, `hard_pairs_image_acc`); see long_text.py. Also only for `shapes` runs.
- `shapes_binding`: how often a test image's short caption scores above the same caption with its salient object's
  colour (`binding_colour_acc`) or shape (`binding_shape_acc`) replaced by another training pair's (method negclip's
  negatives; SugarCrepe's replace kind), on held-out pairs and on seen ones (`_seen`); and, on seen pairs' scenes of
  two objects of other colours and shapes, "a red circle and a blue star." above "a blue circle and a red star."
  (`binding_swap_acc`: ARO's VG-Attribution test, Yuksekgonul et al. 2023, on shapes; a bag of words ties, which
  counts as a failure). Also only for `shapes` runs.
- `long_text_set`: retrieval on `path`, a folder in the Urban-1k layout, a JSON file or a caption table
  (`<name>_i2t_r1`, ...).
- `zero_shot_folder`: zero-shot top-1/5 on `path`, images in class folders (`<name>_top1`, `<name>_skipped`, and
  `<name>_top5` where there are over 5 classes).
- `zero_shot_tfds`: zero-shot top-1/5 on a TFDS classification set read through `tfds.data_source`
  (`<name>_top1`, `<name>_top5` over 5 classes; the `[tfds]` extra).
- `few_shot`: top-1 on the base and new classes of `config.few_shot` and their harmonic mean (`run_few_shot`).
- `shapes_audio`, `zero_shot_audio_folder`: a model with an audio tower (AudioCLIP); see audio.py.
- `shapes_segmentation`, `segmentation_folder`: per-pixel labels named in text, mIoU; see segmentation.py.
- `shapes_detection`, `coco_detection`: boxes of classes named in text, COCO box AP on base and novel classes; a
  detection method's (ViLD, GLIP); see detection.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import typing
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from clip_jax.data.audio import read_audio_table
from clip_jax.data.classification import class_embeddings, few_shot_task, read_names
from clip_jax.data.folder_source import ImageFolderSource
from clip_jax.data.pipeline import get_source, shapes_held_out_split
from clip_jax.data.shapes import ZERO_SHOT_TEMPLATES, with_article
from clip_jax.data.tokenizer import READS_ALIKE, ClipTokenizer, same_text
from clip_jax.errors import ConfigError, UnscorableClasses
from clip_jax.evaluate import tell_once, trained_on_shapes
from clip_jax.evaluate.audio import (
    ShapesAudioEval,
    ZeroShotAudioFolderEval,
    run_shapes_audio,
    run_zero_shot_audio_folder,
)
from clip_jax.evaluate.classify import refuse_same_tokens
from clip_jax.evaluate.detection import (
    CocoDetectionEval,
    ShapesDetectionEval,
    check_coco_detection,
    run_coco_detection,
    run_shapes_detection,
)
from clip_jax.evaluate.encoder import Encoder
from clip_jax.evaluate.long_text import (
    hard_pairs,
    hard_pairs_accuracy,
    load_long_text_set,
    long_text_pairs,
    shapes_long_captions,
)
from clip_jax.evaluate.retrieval import retrieval_recall
from clip_jax.evaluate.segmentation import (
    SegmentationFolderEval,
    ShapesSegmentationEval,
    check_overlay_dir,
    run_segmentation_folder,
    run_shapes_segmentation,
)
from clip_jax.evaluate.zero_shot import accuracy_entries, evaluate_zero_shot, zero_shot_accuracy, zero_shot_by_split

log = logging.getLogger(__name__)

_WORDNET_ID = re.compile(r"n\d{8}")  # ImageNet's class folders: n01440764, ...

# CLIP's short prompt for zero-shot classification of natural images.
PHOTO_TEMPLATES = ("a photo of a {}.",)


@dataclasses.dataclass(frozen=True)
class Context:
    """What every evaluator receives: the run's config, the encoder (the model on the mesh), the tokenizer, and the
    method with the parameters, for its own predict functions."""

    config: ml_collections.ConfigDict
    encoder: Encoder
    tokenizer: ClipTokenizer
    method: Any = None
    params: Any = None

    def texts(self, texts) -> np.ndarray:
        return self.encoder.texts(self.tokenizer(list(texts), self.config.model.text.context_length))

    def scores(self, examples: dict[str, np.ndarray], classes: list[int], task) -> np.ndarray:
        """[N, C] class scores of examples (`features`: normalised image embeddings; `images`: uint8) for the task's
        classes `classes`: the method's (`scores`), or zero-shot CLIP's with the task's templates for a method
        without."""
        method_scores = getattr(self.method, "scores", None)
        if method_scores is not None:
            return method_scores(self.params, examples, classes)
        names = [task.class_names[c] for c in classes]
        return examples["features"] @ class_embeddings(self.texts, names, task.templates).T

    def num_examples(self, entry) -> int:
        return entry.num_examples if entry.num_examples is not None else self.config.eval.num_examples


# --- shapes ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShapesEval:
    every_steps: int | None = None
    num_examples: int | None = None  # None: eval.num_examples


@functools.lru_cache(maxsize=8)
def _shapes_eval_data(config_json: str, split: str, n: int, caption: str | None):
    """Eval examples are deterministic: render them once per process, not at every evaluation."""
    config = ml_collections.ConfigDict(json.loads(config_json))
    source = get_source(config, split)
    items = [source[i] for i in range(n)]
    images = np.stack([it["image"] for it in items])
    labels = np.asarray([it["label"] for it in items])
    captions = [it[caption] for it in items] if caption else None
    return images, labels, captions


def run_shapes(ctx: Context, name: str, entry: ShapesEval) -> dict[str, float]:
    if not trained_on_shapes(ctx.config, name):
        return {}
    config, n = ctx.config, ctx.num_examples(entry)
    key = config.to_json()
    classes = class_embeddings(ctx.texts, get_source(config, "test").class_names(), ZERO_SHOT_TEMPLATES)
    splits = {}
    for split, suffix in (shapes_held_out_split(config), ("test_seen", "_seen")):
        images, labels, _ = _shapes_eval_data(key, split, n, None)
        splits[suffix] = ctx.encoder.images(images), labels
    results = zero_shot_by_split(splits, classes, "zero_shot")
    images, _, captions = _shapes_eval_data(key, "test", n, "long_caption")
    recall = retrieval_recall(ctx.encoder.images(images), ctx.texts(captions), texts=captions)
    results.update({k: float(v) for k, v in recall.items()})
    return results


def run_shapes_long_text(ctx: Context, name: str, entry: ShapesEval) -> dict[str, float]:
    if not trained_on_shapes(ctx.config, name):
        return {}
    size, seed, n = ctx.config.model.vision.image_size, ctx.config.seed, ctx.num_examples(entry)
    images, captions = shapes_long_captions(size, seed, n, ctx.tokenizer)
    recall = retrieval_recall(ctx.encoder.images(images), ctx.texts(captions), texts=captions)
    results = {f"long_{k}": float(v) for k, v in recall.items()}
    images, captions = hard_pairs(size, seed, n // 2, ctx.tokenizer)
    pairs = hard_pairs_accuracy(ctx.encoder.images(images), ctx.texts(captions))
    results["hard_pairs_acc"], results["hard_pairs_image_acc"] = pairs["pairs"], pairs["images"]
    return results


@functools.lru_cache(maxsize=4)
def _replaced_captions(config_json: str, split: str, n: int) -> tuple[list[str], dict[str, list[str]]]:
    """The first `n` items' short captions of `split` and, per attribute, the same with it replaced."""
    source = get_source(ml_collections.ConfigDict(json.loads(config_json)), split)
    captions = [source.captions(i)["short_caption"] for i in range(n)]
    items = [source.replaced_captions(i) for i in range(n)]
    return captions, {a: [item[a]["short_caption"] for item in items] for a in ("colour", "shape")}


def _two_objects(colour: str, shape: str, other_colour: str, other_shape: str) -> str:
    return f"{with_article(f'{colour} {shape}')} and {with_article(f'{other_colour} {other_shape}')}."


@functools.lru_cache(maxsize=4)
def _swapped_pairs(config_json: str, n: int) -> tuple[np.ndarray, list[str], list[str]]:
    """Up to `n` images of seen pairs' test scenes whose salient object and another differ in colour and in shape,
    with "a {c1} {s1} and a {c2} {s2}." and the same with the two colours swapped (ARO's VG-Attribution pairs: the
    same words, bound the other way)."""
    source = get_source(ml_collections.ConfigDict(json.loads(config_json)), "test_seen")
    images, captions, swapped = [], [], []
    for i in range(20 * n):
        scene = source.scene(i)
        first = scene.salient
        other = next((o for o in scene.objects if o.colour != first.colour and o.shape != first.shape), None)
        if other is None:
            continue
        images.append(source[i]["image"])
        captions.append(_two_objects(first.colour, first.shape, other.colour, other.shape))
        swapped.append(_two_objects(other.colour, first.shape, first.colour, other.shape))
        if len(images) == n:
            break
    return np.asarray(images, np.uint8), captions, swapped


def _beats(image_embeds: np.ndarray, own: np.ndarray, other: np.ndarray) -> float:
    """The share of images whose own text scores above the other (a tie is a failure)."""
    return float(np.mean(np.sum(image_embeds * own, -1) > np.sum(image_embeds * other, -1)))


def run_shapes_binding(ctx: Context, name: str, entry: ShapesEval) -> dict[str, float]:
    if not trained_on_shapes(ctx.config, name):
        return {}
    config, n = ctx.config, ctx.num_examples(entry)
    key, results = config.to_json(), {}
    for split, suffix in (shapes_held_out_split(config), ("test_seen", "_seen")):
        images, _, _ = _shapes_eval_data(key, split, n, None)
        image_embeds = ctx.encoder.images(images)
        captions, replaced = _replaced_captions(key, split, n)
        own = ctx.texts(captions)
        for attribute, texts in replaced.items():
            results[f"binding_{attribute}_acc{suffix}"] = _beats(image_embeds, own, ctx.texts(texts))
    images, captions, swapped = _swapped_pairs(key, n)
    if not captions:  # e.g. data.max_objects = 1
        log.info("evals.%s: no binding_swap_acc: no test scene has two objects of other colours and shapes", name)
        return results
    results["binding_swap_acc"] = _beats(ctx.encoder.images(images), ctx.texts(captions), ctx.texts(swapped))
    return results


# --- files -----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LongTextSetEval:
    # an Urban-1k-layout folder (image/N.jpg, caption/N.txt), a JSON file {image file: caption} or a caption table
    # (.csv/.tsv/.jsonl, columns image and caption; several rows may name one image)
    path: str = ""
    image_root: str = ""  # a caption table's image paths are relative to it (as data.image_root); "": its folder
    every_steps: int | None = None


def run_long_text_set(ctx: Context, name: str, entry: LongTextSetEval) -> dict[str, float]:
    config = ctx.config
    try:
        images, captions, image_of_text, skipped = load_long_text_set(
            entry.path, config.model.vision.image_size, config.data.max_image_bytes, entry.image_root)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"evals.{name}.path: {e}") from None
    context = config.model.text.context_length
    if ctx.tokenizer is not None and (cut := sum(len(ctx.tokenizer.encode(c)) + 2 > context for c in captions)):
        log.warning("evals.%s: %d of the %d captions are longer than the model's %d tokens and are scored on their "
                    "first %d (a model stretched to longer text reads more: clip-jax stretch)", name, cut,
                    len(captions), context, context)
    if trivial := [k for k in (5, 10) if k >= len(images)]:  # every image is among the first k: 1.0 for any model
        log.warning("evals.%s: %d images, so its text-to-image R@%s is 1.0 whatever the model (every image is among "
                    "the first %d); read R@1, or give the set more images", name, len(images),
                    "/R@".join(map(str, trivial)), trivial[0])
    recall = retrieval_recall(ctx.encoder.images(images), ctx.texts(captions), image_of_text, texts=captions)
    # Keys named by the entry, as every evaluator of a path does: two sets in one config keep both results.
    return {**{f"{name}_{k}": float(v) for k, v in recall.items()}, f"{name}_skipped": skipped}


@dataclasses.dataclass(frozen=True)
class ZeroShotFolderEval:
    path: str = ""  # root/<class>/<image>; class names are the folder names with "_" as spaces, or names_file's
    # Lines `folder<TAB>class name` (e.g. ImageNet's WordNet-id folders: `n01440764<TAB>tench`), one per class folder
    # (blank lines and lines starting with # skipped), as few_shot.names_file; "": the folder names.
    names_file: str = ""
    templates: tuple = PHOTO_TEMPLATES  # prompts, "{}" standing for the class name; embeddings averaged
    num_examples: int | None = None  # None: every image; else this many spread over the classes
    every_steps: int | None = None


def folder_class_names(name: str, entry: ZeroShotFolderEval, source: ImageFolderSource) -> list[str]:
    """The class names a zero_shot_folder entry prompts with, in its folders' order: its names_file's, which must
    name every class folder and no other (a ConfigError otherwise), or the folder names. Two names that are one text
    to CLIP are refused: their classes were scored at chance between them, silently."""
    folders = source.folder_names()
    names = _named_classes(name, entry, folders) if entry.names_file else source.class_names()
    if pair := same_text(names):
        (a, b), (first, second) = ([folders[i] for i in pair], [names[i] for i in pair])
        same = f"both named {first!r}" if first == second else f"named {first!r} and {second!r}, one text to CLIP"
        raise ConfigError(f"evals.{name}: the class folders {a!r} and {b!r} are {same} ({READS_ALIKE}): "
                          "the model could not tell them apart; give them distinct names (names_file: "
                          "folder<TAB>class name)")
    return names


def _named_classes(name: str, entry: ZeroShotFolderEval, folders: list[str]) -> list[str]:
    """The names_file's class names, in the folders' order: it names every class folder and no other."""
    try:
        names = read_names(entry.names_file)
    except (OSError, ValueError) as e:
        raise ConfigError(f"evals.{name}.names_file: {e}") from None
    unnamed, stray = [f for f in folders if f not in names], [k for k in names if k not in folders]
    if unnamed or stray:
        problem = (f"names no class for the folders {unnamed[:5]}" if unnamed else
                   f"names classes {stray[:5]} that have no folder in {entry.path}")
        raise ConfigError(f"evals.{name}.names_file: {entry.names_file} {problem}; give each class folder one line "
                          "`folder<TAB>class name`, and no other")
    return [names[folder] for folder in folders]


def run_zero_shot_folder(ctx: Context, name: str, entry: ZeroShotFolderEval) -> dict[str, float]:
    config = ctx.config
    source = ImageFolderSource(entry.path, config.model.vision.image_size, config.data.max_image_bytes)
    class_names, folders = folder_class_names(name, entry, source), source.folder_names()
    _refuse_same_prompts(config, name, entry, class_names, ctx.tokenizer)
    if not entry.names_file and all(_WORDNET_ID.fullmatch(f) for f in folders):
        log.warning("evals.%s: the class folders of %s are WordNet ids (%s, ...), and the prompts say them as they are "
                    "('%s'): give the entry a names_file (lines `folder<TAB>class name`)", name, entry.path,
                    folders[0], entry.templates[0].format(class_names[0]))
    try:
        images, labels, skipped = source.arrays(entry.num_examples)
    except ValueError as e:  # no image there decodes
        raise ConfigError(f"evals.{name}.path: {e} (the warnings above name each file skipped)") from None
    classes = class_embeddings(ctx.texts, class_names, tuple(entry.templates))
    acc = zero_shot_accuracy(ctx.encoder.images(images), labels, classes)
    return accuracy_entries(name, acc, len(classes)) | {f"{name}_skipped": skipped}


@dataclasses.dataclass(frozen=True)
class ZeroShotTfdsEval:
    dataset: str = ""  # a TFDS name, e.g. "cifar10"; prepared in data_dir (tfds build --file_format=array_record)
    split: str = "test"
    data_dir: str = ""  # "" = TFDS's default
    templates: tuple = PHOTO_TEMPLATES
    num_examples: int | None = None  # None: eval.num_examples
    every_steps: int | None = None


def open_tfds(name: str, entry: ZeroShotTfdsEval, image_size: int):
    """The entry's TFDS source, or a ConfigError naming `evals.<name>` (a dataset not prepared, a wrong split)."""
    try:
        from clip_jax.data.tfds_source import TfdsEvalSource  # the optional [tfds] extra

        source = TfdsEvalSource(entry.dataset, entry.split, image_size, data_dir=entry.data_dir or None)
        source.class_names()  # a captioned set, or WordNet ids, cannot be classified zero-shot
    except Exception as e:  # TFDS raises its own types (AssertionError, NotImplementedError, ValueError ...)
        reason = " ".join(str(e).split())
        reason = reason if len(reason) <= 200 else reason[:200] + "..."
        if isinstance(e, ValueError):  # the source's own (a name, a set not prepared, its classes) or a split's
            raise ConfigError(f"evals.{name}: {reason}") from None
        raise ConfigError(f"evals.{name}: cannot read TFDS {entry.dataset!r} split {entry.split!r} ({reason}); "
                          "prepare it (tfds build --file_format=array_record) or set the entry's data_dir") from None
    return source


def run_zero_shot_tfds(ctx: Context, name: str, entry: ZeroShotTfdsEval) -> dict[str, float]:
    source = open_tfds(name, entry, ctx.config.model.vision.image_size)
    acc = evaluate_zero_shot(ctx.encoder.images, ctx.texts, source, source.class_names(), tuple(entry.templates),
                             n=ctx.num_examples(entry))
    return accuracy_entries(name, acc, len(source.class_names()))


# --- few-shot transfer -----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FewShotEval:
    every_steps: int | None = None
    shapes_domain: str = ""  # shapes: also score this rendering domain of the test split (`<name>_shifted_*`)
    # "val": score few_shot.val instead of few_shot.test (`<name>_val_*`), where hyperparameters are chosen (WiSE-FT's
    # alpha: clip-jax wise-ft --split val)
    split: str = "test"


@functools.lru_cache(maxsize=4)
def _few_shot_scored(config_json: str, shapes_domain: str, split: str = "test"):
    """The task, with the set `split` (test or val) as its `test`, and that set's images, read once per process."""
    config = ml_collections.ConfigDict(json.loads(config_json))
    if shapes_domain:
        config.few_shot.shapes_domain = shapes_domain
    task = few_shot_task(config)
    scored = task.val if split == "val" else task.test
    kept, images = [], []
    for i in range(len(scored)):  # one by one: an unreadable image is skipped, as the other evaluations do
        try:
            images.append(scored.read([i])[0])
            kept.append(i)
        except ValueError as e:  # (its message begins with the set's name: "skipping SET" read as the whole set)
            log.warning("few_shot.%s: one image skipped: %s", split, e)
    if not kept:
        raise ConfigError(f"few_shot.{split}: no readable image in {scored.name}")
    if len(kept) < len(scored):
        log.warning("few_shot.%s: %d of its %d images scored", split, len(kept), len(scored))
    return dataclasses.replace(task, test=scored.subset(kept)), np.stack(images)


def run_few_shot(ctx: Context, name: str, entry: FewShotEval) -> dict[str, float]:
    """Top-1 on the test images of the base classes and of the new ones, each among its own classes (the reference
    protocol), and their harmonic mean: `<name>_base`, `<name>_new`, `<name>_hm` (with few_shot.classes "all":
    `<name>_all`). The method's own scores (`scores(params, examples, classes)`), else zero-shot CLIP with the
    task's templates; a method that cannot score the new classes (a linear probe) reports only base."""
    name = f"{name}_val" if entry.split == "val" else name
    domains = {"": ctx.config.few_shot.shapes_domain}
    if entry.shapes_domain and ctx.config.few_shot.dataset == "shapes":  # another set has no rendering domains
        domains["_shifted"] = entry.shapes_domain
    elif entry.shapes_domain:
        tell_once(f"evals.{name}: shapes_domain {entry.shapes_domain!r} is a domain of the shapes set only: no "
                  f"{name}_shifted_* on this {ctx.config.few_shot.dataset} set", logging.INFO)
    results = {}
    for suffix, domain in domains.items():
        task, images = _few_shot_scored(ctx.config.to_json(), domain, entry.split)
        # A method whose learner takes the images (MaPLe, WiSE-FT) scores them itself: no frozen-tower embeddings.
        examples = {"images": images}
        if getattr(ctx.method, "inputs", "features") == "features":
            examples["features"] = ctx.encoder.images(images)
        groups = {"base": task.base, "new": task.new} if task.new else {"all": task.base}
        for group, classes in groups.items():
            rows = np.isin(task.test.labels, classes)
            if not rows.any():  # no test image of these classes (few_shot.eval_examples below their count)
                log.info("evals.%s: no test image of the %s classes", name, group)
                continue
            try:
                scores = ctx.scores({k: v[rows] for k, v in examples.items()}, classes, task)
            except UnscorableClasses as e:  # e.g. a linear probe asked for classes it has no weights for
                log.info("evals.%s: no %s-class scores: %s", name, group, e)
                continue
            targets = np.searchsorted(classes, task.test.labels[rows])
            results[f"{name}{suffix}_{group}"] = float(np.mean(np.argmax(scores, axis=1) == targets))
        base, new = results.get(f"{name}{suffix}_base"), results.get(f"{name}{suffix}_new")
        if base is not None and new is not None:
            results[f"{name}{suffix}_hm"] = 2 * base * new / (base + new) if base + new else 0.0
    return results


Evaluator = tuple[type, Callable[[Context, str, Any], dict[str, float]]]
EVALUATORS: dict[str, Evaluator] = {
    "shapes": (ShapesEval, run_shapes),
    "shapes_long_text": (ShapesEval, run_shapes_long_text),
    "shapes_binding": (ShapesEval, run_shapes_binding),
    "long_text_set": (LongTextSetEval, run_long_text_set),
    "zero_shot_folder": (ZeroShotFolderEval, run_zero_shot_folder),
    "zero_shot_tfds": (ZeroShotTfdsEval, run_zero_shot_tfds),
    "few_shot": (FewShotEval, run_few_shot),
    "shapes_audio": (ShapesAudioEval, run_shapes_audio),
    "zero_shot_audio_folder": (ZeroShotAudioFolderEval, run_zero_shot_audio_folder),
    "shapes_segmentation": (ShapesSegmentationEval, run_shapes_segmentation),
    "segmentation_folder": (SegmentationFolderEval, run_segmentation_folder),
    "shapes_detection": (ShapesDetectionEval, run_shapes_detection),
    "coco_detection": (CocoDetectionEval, run_coco_detection),
}
# Fields an entry of this type must set (a path to read), and fields with a few allowed values.
_CHOICES = {("few_shot", "split"): ("test", "val")}
# Numbers with a range: a background threshold is a probability (above 1, every pixel is background).
_RANGES = {("segmentation_folder", "threshold"): (0.0, 1.0)}
_REQUIRED = {"long_text_set": "path", "zero_shot_folder": "path", "zero_shot_tfds": "dataset",
             "zero_shot_audio_folder": "path", "segmentation_folder": "path", "coco_detection": "annotations"}


def eval_defaults(kind: str) -> dict[str, Any]:
    """An entry of type `kind` with every field at its default."""
    if kind not in EVALUATORS:
        raise ConfigError(f"unknown evaluator type {kind!r}; choose one of {', '.join(sorted(EVALUATORS))}")
    return {"type": kind, **dataclasses.asdict(EVALUATORS[kind][0]())}


def parse_entry(name: str, entry: dict) -> Any:
    """The entry's Config, or a ConfigError naming `evals.<name>`."""
    fields = {k: v for k, v in entry.items() if k != "type"}
    cls = EVALUATORS[entry["type"]][0]
    for key, kind in typing.get_type_hints(cls).items():  # the fields whose default (None) says nothing of their type
        value, allowed = fields.get(key), tuple(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
        accepted = allowed + ((list,) if tuple in allowed else ())  # config.json holds tuples as lists
        wrong = not isinstance(value, accepted) or (isinstance(value, bool) and bool not in allowed)
        if value is not None and wrong:
            raise ConfigError(f"config key 'evals.{name}.{key}' must be {' or '.join(t.__name__ for t in allowed)}, "
                              f"got {type(value).__name__} {value!r}")
    for (kind, key), allowed in _CHOICES.items():
        if entry.get("type") == kind and key in fields and fields[key] not in allowed:
            raise ConfigError(f"config key 'evals.{name}.{key}' is {fields[key]!r}: choose one of "
                              f"{', '.join(map(repr, allowed))}")
    for (kind, key), (low, high) in _RANGES.items():
        if entry.get("type") == kind and key in fields and not low <= fields[key] <= high:
            raise ConfigError(f"config key 'evals.{name}.{key}' must be in [{low:g}, {high:g}], got {fields[key]!r}")
    if entry.get("type") in _REQUIRED and not fields.get(_REQUIRED[entry["type"]]):
        raise ConfigError(f"evals.{name} ({entry['type']}) needs {_REQUIRED[entry['type']]}: set "
                          f"--config.evals.{name}.{_REQUIRED[entry['type']]}=...")
    return cls(**fields)


def check_sources(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None) -> None:
    """Opens the sources of the entries that read datasets by name (TFDS) or class folders, so that a missing one, or
    a folder that is not a set of classes, stops the run before training rather than at its end; and refuses the
    outputs an entry would write over files it must not (a `coco_detection` results_file, an `overlay_dir` in a
    clip_jax workdir: the run's own `workdir`, a new one, counts). That the paths of files and folders exist is
    `config.check_input_paths`'s."""
    for name, entry in config.evals.items():
        if entry.type == "coco_detection" and entry.get("annotations"):
            check_coco_detection(name, parse_entry(name, entry.to_dict()), workdir)
        if entry.get("overlay_dir"):
            check_overlay_dir(name, entry.overlay_dir, workdir)
        if entry.type == "zero_shot_tfds":
            open_tfds(name, parse_entry(name, entry.to_dict()), config.model.vision.image_size)
        elif entry.type == "long_text_set" and entry.path:  # its pairs, read before training (not its images)
            try:
                long_text_pairs(entry.path, entry.get("image_root", ""))
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError(f"evals.{name}.path: {e}") from None
        elif entry.type == "zero_shot_folder" and entry.path:
            try:
                source = ImageFolderSource(entry.path, config.model.vision.image_size)
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError(f"evals.{name}.path: {e}") from None
            folder_class_names(name, parse_entry(name, entry.to_dict()), source)
        elif entry.type == "zero_shot_audio_folder" and entry.path:  # its table and that its files are there
            audio = parse_entry(name, entry.to_dict())
            try:
                read_audio_table(audio.path, audio.audio_root, tuple(audio.folds))
            except ConfigError as e:
                raise ConfigError(f"evals.{name}: {e}") from None


def check_prompts(config: ml_collections.ConfigDict, tokenizer: ClipTokenizer) -> None:
    """The class names of the `zero_shot_folder` entries against the run's tokenizer, once it is made: two whose
    prompts are one token sequence (the context cuts them alike) are refused before training, not at its end."""
    for name, entry in config.evals.items():
        if entry.type == "zero_shot_folder" and entry.path:
            parsed = parse_entry(name, entry.to_dict())
            names = folder_class_names(name, parsed, ImageFolderSource(parsed.path, config.model.vision.image_size))
            _refuse_same_prompts(config, name, parsed, names, tokenizer)


def _refuse_same_prompts(config: ml_collections.ConfigDict, name: str, entry: ZeroShotFolderEval,
                         class_names: list[str], tokenizer: ClipTokenizer) -> None:
    """Class names the cleaning tells apart (`folder_class_names`) whose prompts the context cuts to one (Hindi or
    Arabic in OpenAI's vocabulary: ~3 tokens a character), refused: known once the run's tokenizer is."""
    refuse_same_tokens(f"evals.{name}", class_names, tokenizer, config.model.text.context_length,
                       tuple(entry.templates), "give them distinct names early on (the entry's names_file: "
                       "folder<TAB>class name)")


def due(config: ml_collections.ConfigDict, step: int) -> list[str]:
    """The entries that evaluate at training step `step` (every_steps divides it; 0 or None with eval.every_steps
    0: never during training, only at the end)."""
    names = []
    for name, entry in config.evals.items():
        every = entry.get("every_steps")
        every = config.eval.every_steps if every is None else every
        if every and step % every == 0:
            names.append(name)
    return names


def evaluate(config: ml_collections.ConfigDict, model, params, mesh, tokenizer: ClipTokenizer,
             names: list[str] | None = None, method: Any = None) -> dict[str, float]:
    """The results of the `config.evals` entries `names` (all by default), merged. `method`: the run's, prepared
    (its predict functions)."""
    ctx = Context(config, Encoder(model, params, mesh, config.eval.batch_size), tokenizer, method, params)
    results: dict[str, float] = {}
    for name, entry in config.evals.items():
        if names is None or name in names:
            results.update(EVALUATORS[entry.type][1](ctx, name, parse_entry(name, entry.to_dict())))
    return results


def evaluation_settings(config: Any) -> dict[str, Any]:
    """The settings an evaluation's figures depend on, as JSON: `eval` and `evals` (recorded in eval_<step>.json,
    compared before results of other settings would replace them)."""
    return json.loads(json.dumps({"eval": config.eval.to_dict(), "evals": config.evals.to_dict()}, default=list))


def print_results(results: dict[str, float]) -> None:
    if not results:
        return
    if set(results) == {"step"}:
        print(f"no evaluation results at step {results['step']} (config.evals is empty, or every entry was skipped: "
              "the warnings above say why)", flush=True)
        return
    width = max(len(k) for k in results)
    print("\n" + "results".center(width + 12, "-"))
    for k, v in results.items():
        print(f"{k:<{width}}  {v:>10.4f}" if isinstance(v, float) else f"{k:<{width}}  {v!s:>10}")
    print("-" * (width + 12), flush=True)
