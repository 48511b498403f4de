"""Labelled image sets for few-shot transfer (docs/few_shot.md): where the images and labels come from, the K-shot
sample of a training set, and the split of the classes into base and new.

A set is a `LabelledSet`: class names (the prompt names, in label order), a label per example and a reader of the
images of given examples, so that a K-shot sample reads only its K x C images. Kinds (`config.few_shot.dataset`):
- `shapes`: the procedural scenes' salient colour-shape pair (48 classes), from the splits of `clip_jax.data.shapes`.
- `folder`: `root/<class>/<image>` (torchvision's ImageFolder layout); the labels are the folder names.
- `table`: a CSV or JSONL file with the columns `image` (a path, relative to the file's folder) and `label`.
- `tfds`: a TFDS classification set through `tfds.data_source` (the `[tfds]` extra).
A names file (one class a line, `label` or `label<TAB>prompt name`) fixes the classes of a folder or table and
their order, and renames them; a table's labels must then all be in it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np

from clip_jax.data import shapes
from clip_jax.data.captions import read_table, table_format, text_lines
from clip_jax.data.folder_source import class_folders, classes_in_turn, loose_images
from clip_jax.data.images import DEFAULT_MAX_IMAGE_BYTES, IMAGE_SUFFIXES, image_files, load_image
from clip_jax.data.tokenizer import READS_ALIKE, same_text
from clip_jax.errors import ConfigError

CLASS_SPLITS = ("reference", "balanced")
FEW_SHOT_DATASETS = ("shapes", "folder", "table", "tfds")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LabelledSet:
    """`labels[i]` is the class index (into `class_names`) of example i; `read(indices)` its images, uint8
    [n, S, S, 3]. `name` says where it comes from, for messages."""

    name: str
    class_names: list[str]
    labels: np.ndarray
    read: Callable[[Sequence[int]], np.ndarray]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> LabelledSet:
        indices = np.asarray(indices, np.int64)
        return LabelledSet(self.name, self.class_names, self.labels[indices],
                           lambda rows: self.read(indices[np.asarray(rows, np.int64)]))


def read_names(path: str) -> dict[str, str]:
    """A names file: label -> prompt name, in the file's order (lines `label` or `label<TAB>name`; blank lines and
    lines starting with # are skipped; a byte-order mark, as Windows editors write, is not part of the first label)."""
    names: dict[str, str] = {}
    for number, line in enumerate(text_lines(pathlib.Path(path).read_text(encoding="utf-8-sig")), 1):
        if line.strip() and not line.startswith("#"):
            label, _, name = line.partition("\t")
            if label.strip() in names:  # the later line would rename the class silently
                raise ValueError(f"names file {path}, line {number}: the label {label.strip()!r} is listed again; "
                                 "list each class once")
            names[label.strip()] = (name or label.replace("_", " ")).strip()
    if not names:
        raise ValueError(f"names file {path} lists no class")
    return names


def class_change(expected: Sequence[str], found: Sequence[str]) -> str:
    """How the class list `found` differs from `expected`, for a message: "without [...]; with [...] too", or "in
    another order"."""
    lacks, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    words = [f"without {lacks[:5]}"] * bool(lacks) + [f"with {extra[:5]} too"] * bool(extra)
    return "; ".join(words) or "in another order"


def _distinct(where: str, names: dict[str, str]) -> list[str]:
    """The class names of labels -> names, or a ValueError if two labels share a name: their prompts would be one,
    and the model could not tell the classes apart (folders `red_circle` and `red circle`, say). Names are compared
    as CLIP's tokenizers read them: case and runs of white space aside (`Red Circle` and `red circle`)."""
    labels, texts = list(names), list(names.values())
    if pair := same_text(texts):
        (other, label), (other_name, name) = ([labels[i] for i in pair], [texts[i] for i in pair])
        same = (f"both named {name!r}" if other_name == name else
                f"named {other_name!r} and {name!r}, one text to CLIP ({READS_ALIKE})")
        raise ValueError(f"{where}: the classes {other!r} and {label!r} are {same}; give them distinct names "
                         "(few_shot.names_file: label<TAB>name)")
    return texts


def _read_files(name: str, files: Sequence[pathlib.Path | str], image_size: int, max_bytes: int):
    def read(indices: Sequence[int]) -> np.ndarray:
        try:
            return np.stack([load_image(files[i], image_size, max_bytes) for i in indices])
        except ValueError as e:  # a few-shot sample is small and chosen: a bad image in it is the user's to fix
            raise ConfigError(f"{name}: {e}; replace or remove the file") from None

    return read


def folder_set(root: str, image_size: int, names_file: str = "", max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
               ) -> LabelledSet:
    root_path = pathlib.Path(root)
    if not root_path.is_dir():
        raise ValueError(f"{root} is not a folder of class folders (root/<class>/<image>)")
    folders = {d.name: d for d in class_folders(root_path)}
    if not folders:
        raise ValueError(f"{root} holds no class folder (root/<class>/<image>)")
    if loose := loose_images(root_path):
        log.warning("%s: %d images at the top are in no class folder and are left out (root/<class>/<image>)", root,
                    loose)
    names = read_names(names_file) if names_file else {k: k.replace("_", " ") for k in folders}
    missing = [k for k in names if k not in folders]
    if missing:
        raise ValueError(f"{root}: no folder for the classes {missing[:5]} of {names_file}")
    unlisted = [k for k in folders if k not in names]
    if unlisted:  # a names file may pick classes; a forgotten line should not pass unseen
        log.warning("%s: the folders %s are not in the names file %s: their images are left out", root,
                    unlisted[:5], names_file)
    files, labels = [], []
    for label, key in enumerate(names):
        found = image_files(folders[key])  # (hidden entries left out at every depth, as at the top)
        if not found:
            raise ValueError(f"{root}: the class folder {key!r} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))});"
                             " add images or remove the folder")
        files += found
        labels += [label] * len(found)
    return LabelledSet(str(root), _distinct(str(root), names), np.asarray(labels, np.int64),
                       _read_files(str(root), files, image_size, max_bytes))


def table_set(path: str, image_size: int, names_file: str = "", max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
              ) -> LabelledSet:
    fmt = table_format(path)
    rows = read_table(path, fmt, fields=("image", "label", "short_caption"))
    bad = [r.key for r in rows if r.problem or r.caption in (None, "")]
    if bad:
        raise ValueError(f"{path}: rows without an image or a label ({', '.join(bad[:3])}); every row needs both")
    data_labels = [str(r.caption).strip() for r in rows]
    names = read_names(names_file) if names_file else {k: k.replace("_", " ") for k in sorted(set(data_labels))}
    missing = sorted(set(data_labels) - set(names))
    if missing:
        raise ValueError(f"{path}: the labels {missing[:5]} are not in the names file {names_file}; add them")
    index = {k: i for i, k in enumerate(names)}
    return LabelledSet(path, _distinct(path, names), np.asarray([index[k] for k in data_labels], np.int64),
                       _read_files(path, [r.image for r in rows], image_size, max_bytes))


def tfds_set(dataset: str, split: str, image_size: int, data_dir: str = "", names_file: str = "") -> LabelledSet:
    from clip_jax.data.tfds_source import TfdsEvalSource  # the optional [tfds] extra

    names = list(read_names(names_file).values()) if names_file else None
    source = TfdsEvalSource(dataset, split, image_size, data_dir=data_dir or None, class_names=names)
    labels = np.asarray([source.source[i][source.label_key] for i in range(len(source))], np.int64)
    return LabelledSet(f"TFDS {dataset} {split}", source.class_names(), labels,
                       lambda rows: np.stack([source[int(i)]["image"] for i in rows]))


def shapes_set(split: str, size: int, image_size: int, seed: int = 0, domain: str = "clean") -> LabelledSet:
    """The first `size` scenes of a shapes split, labelled by their salient pair. The labels come from the scene
    descriptions, so only the images read are rendered."""
    data = shapes.ShapesDataset(shapes.ShapesConfig(image_size=image_size, seed=seed, domain=domain), split)
    labels = np.asarray([shapes.class_index(s.salient.colour, s.salient.shape)
                         for s in map(data.scene, range(size))], np.int64)
    return LabelledSet(f"shapes {split}", data.class_names(), labels,
                       lambda rows: np.stack([data[int(i)]["image"] for i in rows]))


def normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def class_embeddings(
    encode_texts: Callable[[list[str]], np.ndarray], class_names: Sequence[str], templates: Sequence[str]
) -> np.ndarray:
    """[C, D] prompt-ensemble embedding of each class: the mean of its normalised template embeddings,
    renormalised. Templates contain "{}" where the class name goes."""
    if not class_names or not templates:
        raise ValueError("need at least one class name and one template")
    for template in templates:
        if "{}" not in template:
            raise ValueError(f"template {template!r} has no '{{}}' for the class name")
    # One encode call for all C x T prompts: the encoder batches them efficiently.
    prompts = [template.format(name) for name in class_names for template in templates]
    return prompt_ensemble(encode_texts(prompts), len(class_names))


def prompt_ensemble(prompt_embeds: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, D] class embeddings of the [C x T, D] embeddings of C classes' prompts, class-major: the mean of each
    class's normalised prompt embeddings, renormalised."""
    embeds = np.asarray(prompt_embeds, np.float32).reshape(num_classes, -1, prompt_embeds.shape[-1])
    # Normalising each template embedding first makes the ensemble a mean of directions whatever the encoder
    # returns, so no template outweighs the others by its norm.
    return normalize(normalize(embeds).mean(axis=1))


def sample_shots(labels: np.ndarray, classes: Sequence[int], shots: int, seed: int, name: str = "the set",
                 class_names: Sequence[str] | None = None) -> np.ndarray:
    """Indices of `shots` examples of each class in `classes`, drawn without replacement by `seed` (the same seed
    gives the same sample), in class order. Raises ValueError naming a class (by `class_names`, else its index)
    with fewer examples."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in classes:
        pool = np.flatnonzero(labels == c)
        if len(pool) < shots:
            named = f"class {class_names[c]!r}" if class_names is not None else f"class {c}"
            raise ValueError(f"{name}: {named} has {len(pool)} examples, fewer than {shots} shots; lower "
                             "few_shot.shots or add examples (on shapes: raise few_shot.shapes_pool, the scenes the "
                             "shots are drawn from)")
        picked.append(np.sort(rng.choice(pool, shots, replace=False)))
    return np.concatenate(picked) if picked else np.zeros(0, np.int64)


def split_classes(class_names: Sequence[str], how: str = "reference", seed: int = 0,
                  among: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """(base, new) class indices among `among` (default: all). "reference": CoCoOp's protocol, the first half of the
    classes sorted by label (ceil(C/2)) is base; "balanced": a random half fixed by `seed`, so base and new classes
    come from the same distribution (with "reference", shapes' new classes have colours never tuned on)."""
    among = list(range(len(class_names))) if among is None else sorted(among)
    cut = math.ceil(len(among) / 2)
    if how == "reference":
        return among[:cut], among[cut:]
    if how == "balanced":
        order = np.random.default_rng(seed).permutation(len(among))
        return sorted(among[i] for i in order[:cut]), sorted(among[i] for i in order[cut:])
    raise ValueError(f"unknown class split {how!r}; choose one of {', '.join(CLASS_SPLITS)}")


@dataclasses.dataclass(frozen=True)
class FewShotTask:
    """The sets of one few-shot experiment (`config.few_shot`): `train`, the K-shot sample of the training classes;
    `val` and `test`, held-out sets over every class (capped at few_shot.eval_examples); `base` and `new`, the class
    indices of the split: training uses the base classes only (all of them, `new` empty, with few_shot.classes
    "all"); `templates`, the zero-shot prompts."""

    class_names: list[str]
    train: LabelledSet
    val: LabelledSet
    test: LabelledSet
    base: list[int]
    new: list[int]
    templates: tuple[str, ...]


def _open(config: ml_collections.ConfigDict, which: str) -> LabelledSet:
    f, size = config.few_shot, config.model.vision.image_size
    if f.dataset == "shapes":
        split = {"train": "train", "val": "val", "test": "test"}[which]
        count = f.shapes_pool if which == "train" else f.eval_examples
        return shapes_set(split, count, size, seed=config.seed, domain=f.shapes_domain)
    location = f[which]
    if not location:
        what = "the split name" if f.dataset == "tfds" else "its path"
        raise ValueError(f"few_shot.{which} is not set: give {what}")
    if f.dataset == "tfds":
        return tfds_set(f.tfds_name, location, size, f.tfds_data_dir, f.names_file)
    if not pathlib.Path(location).exists():  # a typo, or a set moved since its run trained
        raise ValueError(f"few_shot.{which}: {location} does not exist (a typo? A run that has trained reads its "
                         "sets where it trained on them: put a moved set back there)")
    opener = folder_set if f.dataset == "folder" else table_set
    return opener(location, size, f.names_file, config.data.max_image_bytes)


def few_shot_task(config: ml_collections.ConfigDict) -> FewShotTask:
    """The task `config.few_shot` describes, or a ConfigError naming what is wrong with it."""
    f = config.few_shot
    try:
        full_train, val, test = (_open(config, which) for which in ("train", "val", "test"))
        names = full_train.class_names
        for other in (val, test):
            if other.class_names != names:
                raise ValueError(f"{other.name}'s classes differ from the training set's "
                                 f"({class_change(names, other.class_names)}): give every set the same classes "
                                 "(few_shot.names_file)")
        if len(names) < 2:  # every prediction right, the loss 0: nothing to learn or to score
            raise ValueError(f"{full_train.name} holds one class, {names[0]!r}: a few-shot task needs two or more")
        base, new = _task_groups(config, names)
        if f.classes != "all" and (lone := [g for g, members in (("base", base), ("new", new)) if len(members) == 1]):
            log.warning("few_shot: the %d classes split into %d base and %d new: a group of one class scores top-1 "
                        "1.0 whatever the model (%s); give four classes or more, or few_shot.classes 'all'",
                        len(names), len(base), len(new), ", ".join(f"few_shot_{g}" for g in lone))
        shots = sample_shots(full_train.labels, base, f.shots, f.seed, full_train.name, names)

        def keep(labelled: LabelledSet) -> LabelledSet:
            """At most eval_examples of the task's classes, spread over them (a set listed class by class would
            keep only its first classes), in the set's order."""
            rows = np.flatnonzero(np.isin(labelled.labels, base + new))
            return labelled.subset(np.sort(rows[classes_in_turn(labelled.labels[rows], f.eval_examples)]))

    except ValueError as e:  # (a message naming its few_shot field already: not "few_shot: few_shot.train: ...")
        raise ConfigError(str(e) if str(e).startswith("few_shot.") else f"few_shot: {e}") from None
    return FewShotTask(names, full_train.subset(shots), keep(val), keep(test), base, new, name_templates(config))


def _task_groups(config: ml_collections.ConfigDict, names: Sequence[str]) -> tuple[list[int], list[int]]:
    """(base, new) class indices of a task of the classes `names`: few_shot's split, or all of them as base."""
    f = config.few_shot
    among = None
    if f.dataset == "shapes":  # the pairs held out of pretraining are never few-shot classes
        among = shapes.ShapesDataset(shapes.ShapesConfig(), "train").seen_classes()
    base, new = split_classes(names, f.class_split, f.seed, among)
    return (sorted(base + new), []) if f.classes == "all" else (base, new)


DEFAULT_TEMPLATES = ("a photo of a {}.",)


def name_templates(config: ml_collections.ConfigDict, reads_data: bool = False) -> tuple[str, ...]:
    """The prompts of a run's class names: its few_shot.templates; else, where its classes are shapes pairs (a
    few-shot set's, or, for a method that `reads_data`, its training data's), the shapes prompts its evaluations use;
    else CLIP's "a photo of a {}."."""
    on_shapes = (config.data.source if reads_data else config.few_shot.dataset) == "shapes"
    return tuple(config.few_shot.templates) or (shapes.ZERO_SHOT_TEMPLATES if on_shapes else DEFAULT_TEMPLATES)


def recorded_task(config: ml_collections.ConfigDict, names: Sequence[str], why: str) -> FewShotTask:
    """The task of a trained run whose sets are not where it read them (a workdir copied to another machine to
    classify): its classes `names` as the run recorded them, split as then; its sets hold no image, and reading one
    is a ConfigError saying `why` (an evaluation scores the sets: it needs them back)."""

    def unreadable(rows: Sequence[int]) -> np.ndarray:
        raise ConfigError(why if why.startswith("few_shot.") else f"few_shot: {why}")

    names = [str(n) for n in names]
    empty = LabelledSet("few_shot (not found)", names, np.zeros(0, np.int64), unreadable)
    base, new = _task_groups(config, names)
    return FewShotTask(names, empty, empty, empty, base, new, name_templates(config))
