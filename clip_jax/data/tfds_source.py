"""TFDS datasets as evaluation sources, read through `tfds.data_source` (ArrayRecord files, random access).

`tfds.data_source` needs neither TensorFlow nor tf.data: `pip install tensorflow-datasets` (the `[tfds]` extra)
is enough to read a prepared dataset, e.g. one `tfds build --file_format=array_record` wrote, or one in a TFDS
data directory on GCS (`data_dir="gs://..."`). Some builders (e.g. coco_captions) import TensorFlow in their own
code; use those from a data directory with TensorFlow installed, or convert them once.

Items follow our eval format (as `shapes` test splits):
  - classification sets (a `ClassLabel` feature): {"image": uint8 [S, S, 3], "label": int}; `class_names()`
    gives the prompt names (the dataset's label names with "_" as spaces, unless given).
  - captioned sets (a `Text` feature, or a `Sequence` of them, such as coco_captions' captions/text):
    {"image": uint8 [S, S, 3], "captions": [str, ...]}.
Images are resized (shorter side to S, bicubic) and centre-cropped, as CLIP's eval transform; grayscale images are
repeated to RGB and an alpha channel is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from clip_jax.data.images import resize_center_crop, scale_to_uint8

CAPTION_NAMES = ("caption", "captions", "text", "sentences", "description")


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError("TFDS evaluation sources need tensorflow-datasets: pip install 'clip_jax[tfds]' (TensorFlow "
                          "itself is not needed)") from None
    return tfds


def _find_label(features) -> str | None:
    tfds = _tfds()
    labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    return "label" if "label" in labels else (labels[0] if labels else None)


def _find_image(features) -> str:
    tfds = _tfds()
    images = [k for k, f in features.items() if isinstance(f, tfds.features.Image) and f.shape[-1] in (1, 3, 4)]
    if not images:
        raise ValueError(f"no image feature among {sorted(features)}")
    return "image" if "image" in images else images[0]


def _find_caption(features) -> tuple[str, ...] | None:
    """The path to the caption text: ("caption",) for a Text feature, ("captions", "text") for a Sequence of
    {"text": Text}, ... Caption-like names are preferred, then any text."""
    tfds = _tfds()

    def paths(feats, prefix=()):
        for key, f in feats.items():
            inner = f.feature if isinstance(f, tfds.features.Sequence) else f
            if isinstance(inner, tfds.features.Text):
                yield (*prefix, key)
            elif isinstance(inner, tfds.features.FeaturesDict):
                yield from paths(inner, (*prefix, key))

    found = list(paths(features))
    named = [p for p in found if any(part in CAPTION_NAMES for part in p)]
    return (named or [None])[0]


def _texts(value: Any) -> list[str]:
    values = [value] if isinstance(value, str | bytes) else list(np.asarray(value, dtype=object).reshape(-1))
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def to_rgb_array(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] of a TFDS image array [H, W, 1|3|4] (or [H, W])."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    if image.dtype != np.uint8:  # e.g. 16-bit medical images
        image = scale_to_uint8(image)
    return np.ascontiguousarray(image[..., :3])


def _data_source(tfds, name: str, split: str, data_dir: str | None, download: bool):
    """`tfds.data_source`, whose errors for the two common mistakes name neither: a misspelt name lists every
    builder TFDS has, and a dataset never prepared in data_dir says that the TFRECORD format is not supported."""
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    except tfds.core.DatasetNotFoundError:
        raise ValueError(f"TFDS has no dataset named {name!r} (tfds.list_builders() lists the names)") from None
    except Exception:
        builder = tfds.builder(name, data_dir=data_dir)
        if not download and not builder.is_prepared():
            raise ValueError(f"TFDS {name} is not prepared in {builder.data_dir}: prepare it there "
                             f"(tfds build {name.split('/')[0]} --file_format=array_record"
                             f"{f' --data_dir {data_dir}' if data_dir else ''}), or give the data_dir that holds "
                             "it") from None
        raise


class TfdsEvalSource:
    """Random-access eval source over one split of a TFDS dataset (see the module docstring for the items).

    name, split: as for `tfds.data_source` ("cifar10", "test"; "imagenet_v2/matched-frequency", "test[:1000]").
    image_key, label_key, caption_key: override the features found automatically (caption_key may be a path
    "captions/text"). class_names: prompt names in label order, for sets whose label names are ids (ImageNet's
    are WordNet ids such as n01440764). download: let TFDS download and prepare a missing dataset (needs
    network, and TensorFlow for many builders); by default a missing dataset is an error naming data_dir.
    """

    def __init__(self, name: str, split: str, image_size: int, *, data_dir: str | None = None,
                 image_key: str | None = None, label_key: str | None = None, caption_key: str | None = None,
                 class_names: Sequence[str] | None = None, download: bool = False):
        tfds = _tfds()
        self.name, self.split, self.image_size = name, split, image_size
        self.source = _data_source(tfds, name, split, data_dir, download)
        features = self.source.dataset_info.features
        self.image_key = image_key or _find_image(features)
        self.label_key = label_key or (None if caption_key else _find_label(features))
        self.caption_path = tuple(caption_key.split("/")) if caption_key else (
            None if self.label_key else _find_caption(features))
        if self.label_key is None and self.caption_path is None:
            raise ValueError(f"TFDS {name}: no ClassLabel or Text feature among {sorted(features)}; "
                             "pass label_key or caption_key")
        self._names = list(class_names) if class_names is not None else None
        if self.label_key and self._names is None:
            self._names = [n.replace("_", " ") for n in features[self.label_key].names]
        if self._names is not None and self.label_key:
            num_classes = features[self.label_key].num_classes
            if len(self._names) != num_classes:
                raise ValueError(f"TFDS {name}: {len(self._names)} class names for {num_classes} classes")

    @property
    def kind(self) -> str:
        return "classification" if self.label_key else "captions"

    def class_names(self) -> list[str]:
        if self._names is None:
            raise ValueError(f"TFDS {self.name} is a captioned set: it has no class names")
        if all(re.fullmatch(r"n\d{8}", n) for n in self._names[:10]):
            raise ValueError(f"TFDS {self.name}'s label names are WordNet ids ({self._names[0]}, ...): pass "
                             "class_names with the prompt names of its classes")
        return list(self._names)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.source[index]
        item = {"image": resize_center_crop(to_rgb_array(example[self.image_key]), self.image_size)}
        if self.label_key:
            item["label"] = int(example[self.label_key])
        else:
            value = example
            for part in self.caption_path:
                value = value[part]
            item["captions"] = _texts(value)
        return item


def classification_arrays(source: TfdsEvalSource, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, S, S, 3], labels int64 [N]) of the first n examples (all by default), for
    `zero_shot.zero_shot_accuracy` against `classification.class_embeddings(..., source.class_names(), templates)`."""
    items = [source[i] for i in range(min(n or len(source), len(source)))]
    return np.stack([it["image"] for it in items]), np.asarray([it["label"] for it in items], np.int64)


def retrieval_arrays(source: TfdsEvalSource, n: int | None = None) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(images [N, S, S, 3], captions [M], image_of_text int64 [M]) of the first n examples, for
    `retrieval.retrieval_recall(images_emb, texts_emb, image_of_text, texts=captions)`. An example without
    captions is left out (retrieval needs one per image)."""
    images, captions, owner = [], [], []
    for i in range(min(n or len(source), len(source))):
        item = source[i]
        texts = [t for t in item["captions"] if t.strip()]
        if not texts:
            continue
        owner.extend([len(images)] * len(texts))
        images.append(item["image"])
        captions.extend(texts)
    return np.stack(images), captions, np.asarray(owner, np.int64)
