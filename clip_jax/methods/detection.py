"""What the open-vocabulary detection methods (ViLD, GLIP; methods/vild.py, methods/glip.py) share: their training
set, the per-patch box targets, the cache of what they compute once, the warm start from a CLIP, and the queries
protocol of their predict function (`detection_queries`, read by evaluate/detection.py and `clip-jax detect`).

Training data: `train_examples` scenes of the `train` split of `shapes` (seen colour-shape pairs only; the held-out
pairs are the novel classes), or the images of a COCO instances file (`annotations`, `image_root`) whose categories
`novel` are left out: their boxes are removed, so those objects are background to the training loss, as LVIS's rare
categories are to ViLD's. The set is held in memory (`array_iterator`): a small-data setting, like the few-shot
methods'. Every example carries its image, and each patch of the grid its assigned box and class
(data/detection.py::patch_targets).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from etils import epath

from clip_jax.data.classification import class_change
from clip_jax.data.coco import annotation_summary
from clip_jax.data.detection import (
    DetectionSet,
    category_names,
    coco_detection_set,
    patch_targets,
    shapes_detection_set,
)
from clip_jax.data.pipeline import Captions, array_iterator, shapes_config
from clip_jax.data.shapes import class_names
from clip_jax.errors import ConfigError
from clip_jax.methods.base import Field, Method, Preparation, cached_arrays
from clip_jax.models import flops
from clip_jax.models.clip import CLIPConfig

CACHE = "detection_train.npz"  # the training arrays, in the workdir
# What a warm start reads from the CLIP checkpoint; the detection heads start anew.
CLIP_PARAMS = ("visual", "text", "logit_scale", "logit_bias")


@dataclasses.dataclass(frozen=True)
class DetectionConfig:
    train_examples: int = 2000  # shapes scenes of the training set (a COCO file: its first images, at most this)
    annotations: str = ""  # a COCO instances file to train on instead of shapes; image_root its images
    image_root: str = ""
    novel: tuple = ()  # a COCO file's categories left out of training (named zero-shot at test)
    box_width: int = 128  # the box head's MLP
    l1_weight: float = 5.0  # box regression: L1 (DETR's 5) + GIoU (GLIP's and DETR's 2)
    giou_weight: float = 2.0


class DetectionMethod(Method):
    """The shared part of a detection method (module docstring); a subclass adds its own arrays (`extra_arrays`,
    `extra_fields`), model, step and queries."""

    fixed_groups = ("model", "method", "data")  # the cached training arrays depend on all three
    # Fields of `config.method` the training arrays do not depend on: runs that differ only in them (the variants of
    # an experiment) can share the cache file.
    model_fields: tuple[str, ...] = ("box_width", "l1_weight", "giou_weight")

    def __init__(self, config):
        super().__init__(config)
        if not self.hparams.annotations and config.data.source != "shapes":
            raise ConfigError(f"method {self.name} trains on shapes scenes (data.source 'shapes') or on a COCO file "
                              f"(method.annotations), not on data.source {config.data.source!r}")
        if config.data.augment:
            raise ConfigError(f"method {self.name} needs data.augment False: a crop would not move the boxes")
        if self.hparams.train_examples < 1:
            raise ConfigError(f"method.train_examples must be >= 1, got {self.hparams.train_examples}")
        self.prep: Preparation | None = None
        self._arrays: dict[str, np.ndarray] | None = None

    # --- classes ------------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every class of the data: shapes' 48 colour-shape pairs, or the COCO file's categories."""
        return category_names(self.hparams.annotations) if self.hparams.annotations else class_names()

    def novel_names(self) -> set[str]:
        if self.hparams.annotations:
            return set(self.hparams.novel)
        return {f"{c} {s}" for c, s in shapes_config(self.config).held_out}

    def base_mask(self, names: list[str]) -> np.ndarray:
        """float32 [C]: 1 for a class trained on (ViLD's `lvis_rare_masks` convention: 1 = base), 0 otherwise."""
        novel = self.novel_names()
        trained = set(self.names()) - novel
        return np.asarray([n in trained for n in names], np.float32)

    # --- data ---------------------------------------------------------------------------------------------------
    def train_set(self) -> DetectionSet:
        h, size = self.hparams, self.config.model.vision.image_size
        if not h.annotations:
            objects = (self.config.data.min_objects, self.config.data.max_objects)
            return shapes_detection_set(self.config, "train", h.train_examples, objects)
        data = coco_detection_set(h.annotations, h.image_root, size, h.train_examples)
        novel = [data.names.index(n) for n in h.novel]
        keep = [~np.isin(c, novel) for c in data.classes]  # novel objects become background
        return DetectionSet(data.images, [b[k] for b, k in zip(data.boxes, keep, strict=True)],
                            [c[k] for c, k in zip(data.classes, keep, strict=True)], data.names)

    def fields(self) -> dict[str, Field]:
        vision = self.model_config().vision
        size, p = vision.image_size, vision.num_patches
        return {"image": Field((size, size, 3), np.uint8), "patch_boxes": Field((p, 4), np.float32),
                "patch_classes": Field((p,), np.int32), **self.extra_fields()}

    def extra_fields(self) -> dict[str, Field]:
        return {}

    def extra_arrays(self, prep: Preparation, data: DetectionSet) -> dict[str, np.ndarray]:
        """The method's own per-example arrays, computed once before training (cached with the rest)."""
        return {}

    def captions(self) -> Captions:
        return Captions({})

    def prepare(self, prep: Preparation) -> None:
        self.prep = prep  # the training arrays are made on first use: `detect` and `eval` need none of them

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The training arrays: read from the workdir's cache `detection_train.npz`, or made (and cached: ViLD's
        teacher embeddings cost a pass of the CLIP over every region crop). The cache of another workdir whose run
        differs only in `model_fields` may be copied in."""
        if self._arrays is None:
            if self.prep is None:
                raise RuntimeError(f"{type(self).__name__}.prepare must run before the training arrays are read")
            method = {k: v for k, v in self.config.method.to_dict().items() if k not in self.model_fields}
            settings = json.dumps({"method": method, "data": self.config.data.to_dict(), "seed": self.config.seed,
                                   "image_size": self.config.model.vision.image_size}, sort_keys=True, default=list)

            source = self._source()  # read before the file is: an edit made meanwhile then shows next launch

            def make() -> dict[str, np.ndarray]:
                data = self.train_set()
                grid = self.model_config().vision.grid
                targets = [patch_targets(b, c, grid) for b, c in zip(data.boxes, data.classes, strict=True)]
                return {"image": data.images, "patch_boxes": np.stack([t[0] for t in targets]),
                        "patch_classes": np.stack([t[1] for t in targets]), **self.extra_arrays(self.prep, data)}

            def source_changed(stored: dict[str, np.ndarray]) -> str:
                # The settings name the annotation file by its path: an edit of the file in place (a category
                # renamed, boxes moved) leaves them equal, and the cache would train on the old boxes under the new
                # names.
                old_names, new_names = stored["class_names"].tolist(), source["class_names"].tolist()
                what = "" if old_names == new_names else f" (categories {class_change(old_names, new_names)})"
                return (f"{self.prep.workdir / CACHE} holds the training arrays of method.annotations "
                        f"{self.hparams.annotations} as it was before an edit{what}: restore the file, or train a new "
                        f"run in a new --workdir (with no checkpoint yet: remove {CACHE} to remake it)")

            arrays = cached_arrays(self.prep, CACHE, settings, make, f"the training arrays of {self.name} settings",
                                   source, source_changed)
            self._arrays = arrays
        return self._arrays

    def _source(self) -> dict[str, np.ndarray]:
        """What the training arrays are made from beyond the settings, stored with them: the classes, and the
        annotation file's content hash ("" for shapes scenes, which the settings define)."""
        digest = ""
        if self.hparams.annotations:
            digest = hashlib.sha256(epath.Path(self.hparams.annotations).read_bytes()).hexdigest()
        return {"class_names": np.asarray(self.names(), dtype=str), "annotation_sha256": np.array(digest)}

    def train_data(self, config, tokenizer, rows) -> Iterator[dict]:
        return array_iterator(self.arrays, config.batch_size, rows, config.seed)

    # --- model --------------------------------------------------------------------------------------------------
    def model_config(self) -> CLIPConfig:
        return CLIPConfig.from_dict(self.config.model.to_dict())

    def init_inputs(self) -> tuple[np.ndarray, ...]:
        cfg = self.config.model
        size = cfg.vision.image_size
        return np.zeros((1, size, size, 3), np.uint8), np.zeros((1, cfg.text.context_length), np.int32)

    def detection_queries(self, texts, tokenizer, names: list[str]) -> Any:
        """The queries the model's `detect` takes for the classes `names`; `texts(list[str])` embeds prompts with
        the run's text tower (normalised [N, D])."""
        raise NotImplementedError

    # --- around the step ----------------------------------------------------------------------------------------
    def check(self, mesh) -> None:
        if not self.config.init_from:
            raise ConfigError(f"method {self.name} needs init_from: a trained CLIP workdir (its image tower is the "
                              "detector's backbone, its text tower names the classes)")
        unknown = set(self.hparams.novel) - set(self.names())
        if unknown:
            raise ConfigError(f"method.novel names {sorted(unknown)}, which are not categories of "
                              f"{self.hparams.annotations}")
        if self.hparams.annotations:
            self._check_has_boxes()

    def _check_has_boxes(self) -> None:
        """A COCO file with no box to learn from (none at all, or only crowd regions or novel categories) would
        train the heads on background alone, and say nothing: refused before any work."""
        summary = annotation_summary(self.hparams.annotations)
        novel_ids = {c["id"] for c in summary.categories if c["name"] in set(self.hparams.novel)}
        if not summary.boxed_category_ids - novel_ids:
            held = " other than crowd regions and method.novel's categories" if summary.annotations else ""
            raise ConfigError(f"method.annotations {self.hparams.annotations} has no annotations{held}: a detector "
                              "trains on boxes; give a COCO file that has some")

    def base_params(self, params):
        return {k: v for k, v in params.items() if k in CLIP_PARAMS}

    def warm_start(self, restored, initial):
        return {**initial, **restored}  # the CLIP's towers; the heads as initialised

    def flops_per_example(self, trainable: Mapping[str, Any]) -> float:
        """The image tower (three passes if it trains, else one) and the text tower (the method's prompts); the
        heads are small next to them and not counted."""
        cfg = self.model_config()
        return (flops.pass_factor(trainable["visual"]) * flops.image_forward_flops(cfg)
                + flops.pass_factor(trainable["text"]) * flops.text_forward_flops(cfg) * self.text_passes())

    def text_passes(self) -> int:
        """Text tower passes per example in training."""
        return 0
