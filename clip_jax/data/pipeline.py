"""grain input pipelines: deterministic, sharded per host, checkpointable.

train: source -> [decode: `DecodeExample`] -> random map (augment, pick caption) -> this host's rows of each global
batch, each example numbered by its position in this host's stream -> batch -> tokenize -> prefetch. Shuffling and
the random map are keyed by the global example index, so global batch k holds the same examples in the same order
on any number of hosts.
Elements of a batch: `image` uint8 [B, H, W, 3] (normalised on device), the token fields the method's `Captions`
names (int32 [B, length]: `text` for every method; Long-CLIP adds `short_text`), the fields a method adds
(SLIP's image views `ssl_views`, uint8 [B, 2, H, W, 3]; AudioCLIP's `audio`, float32 [B, samples]; an example's
own random key, uint32 [B, 2], under patch dropout and for GroupViT's Gumbel noise: `ExampleKey`), and `stats`,
host-only int [B] fields: `example_index` (the position) and the `MARKS`, which `DataCounts.take` removes and
counts before the batch goes to the device (the compiled step never sees them).
Sources are registered by name in `TRAIN_SOURCES`; each returns a random-access source whose items have `image`
(uint8 HxWx3), or, for a source with `encoded_images = True`, `image_bytes` or a file `path` (decoded by
`DecodeExample`), and the caption fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple

import grain
import jax
import ml_collections
import numpy as np
from absl import flags
from etils import epath
from PIL import Image

from clip_jax.data import captions, records
from clip_jax.data.augment import grayscale, jitter_image, shuffle_pixels
from clip_jax.data.images import (
    DEFAULT_MAX_IMAGE_BYTES,
    crop_min_side,
    decode_error_text,
    open_image,
    random_resized_crop,
    read_image_file,
    resize_center_crop,
)
from clip_jax.data.segmentation import SegmentationFolder
from clip_jax.data.shapes import VALIDATION_HELD_OUT, ShapesConfig, ShapesDataset
from clip_jax.data.tokenizer import ClipTokenizer
from clip_jax.distributed import GlobalBatchRows, barrier, batch_rows, sum_over_processes
from clip_jax.errors import ConfigError, one_line

log = logging.getLogger(__name__)

STATS = "stats"  # a batch's host-only fields (module docstring)
# The caption that does not match an example, where its source has one for the picked caption (the shapes source's
# `<caption>_negative`, data.negative_captions): method negclip's hard negative.
NEGATIVE_CAPTION = "negative_caption"
# Per-example 0/1 marks: what was done to an example's image and caption, set before batching ...
_EXAMPLE_MARKS = ("converted", "upscaled", "bad_utf8")
# ... and at tokenization. The loop logs each as `data_<mark>`, summed over the log window (docs/data.md).
MARKS = (*_EXAMPLE_MARKS, "truncated_caption")
# An image whose shorter side is below this is dropped: tracking pixels and icons show nothing to learn from. Larger
# images below the model's resolution are kept, upsampled by the crop, and marked `upscaled`.
MIN_IMAGE_SIDE = 8
# A training run whose first examples all fail is pointed at the wrong data: stop instead of spinning forever.
_ALL_FAILED_LIMIT = 200


# A method's hook that adds fields of its own to an example (`TrainExample`'s `add_fields`): made from the source
# example with the example's generator.
FieldHook = Callable[[dict, np.random.Generator], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class ExampleKey:
    """A field hook: `field`, uint32 [2], a random key of the example's own, drawn from its generator. Randomness of
    the step drawn from it (patch dropout, GroupViT's Gumbel noise) depends on the example alone: a sharded or
    accumulated step equals one device's, and a resumed run draws what the uninterrupted one would."""

    field: str

    def __call__(self, example: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {self.field: rng.integers(0, 2**32, size=2, dtype=np.uint32)}


@dataclasses.dataclass(frozen=True)
class FieldHooks:
    """Several field hooks as one, each called in turn with the example and its generator."""

    hooks: tuple[FieldHook, ...]

    def __call__(self, example: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        out = {}
        for hook in self.hooks:
            out.update(hook(example, rng))
        return out


class TextField(NamedTuple):
    """A token field of the batch: the caption string it tokenizes and its length in tokens."""

    caption: str
    context_length: int


@dataclasses.dataclass(frozen=True)
class Captions:
    """The captions a method trains on. `fields` maps each token field of the batch to its `TextField`; the caption
    "caption" is the one `TrainExample` picks (long, partial or short, by the data.*_prob fields), and the field
    "text" is the one whose truncation is counted. `add`, if set, maps a source example to more caption strings
    (e.g. Long-CLIP's short caption); it runs in the grain map, so it must be picklable (a module-level class)."""

    fields: Mapping[str, TextField]
    add: Callable[[dict], dict[str, str]] | None = None


def shapes_config(config: ml_collections.ConfigDict) -> ShapesConfig:
    return ShapesConfig(
        image_size=config.model.vision.image_size,
        min_objects=config.data.min_objects,
        max_objects=config.data.max_objects,
        seed=config.seed,
        domain=config.data.shapes_domain,
        validation_held_out=VALIDATION_HELD_OUT if config.data.shapes_validation_pairs else (),
        negative_captions=config.data.negative_captions,
    )


def shapes_held_out_split(config: ml_collections.ConfigDict) -> tuple[str, str]:
    """The split that scores held-out pairs and its metric suffix: a validation run (data.shapes_validation_pairs)
    is scored on its validation pairs ("_val") and never on the test pairs."""
    return ("val_held_out", "_val") if config.data.shapes_validation_pairs else ("test_held_out", "")


def _shapes_source(config: ml_collections.ConfigDict, split: str):
    return ShapesDataset(shapes_config(config), split)


def _file_source(fmt: str | None):
    """A table file source (captions.py); fmt None: the format by the file's suffix."""

    def make(config: ml_collections.ConfigDict, split: str):
        if split != "train":
            raise ValueError(f"data.source {config.data.source!r} has only a train split, not {split!r}")
        d = config.data
        return captions.file_source(d.path, fmt, d.image_root, d.skip, (d.image_field, d.caption_field),
                                    captions.negative_caption_field(d))

    return make


def _segmentation_folder_source(config: ml_collections.ConfigDict, split: str):
    """Images and masks in the VOC layout (data/segmentation.py), the split's list of ids: the dense methods'."""
    return SegmentationFolder(config.data.path, split, config.model.vision.image_size, config.data.max_image_bytes)


TRAIN_SOURCES: dict[str, Callable[[ml_collections.ConfigDict, str], object]] = {
    "shapes": _shapes_source,
    "sharegpt4v": _file_source("sharegpt4v"),
    "captions": _file_source(None),  # JSONL, CSV or TSV
    "records": records.records_source,  # ArrayRecord shards written by `clip-jax data convert` (docs/data.md)
    "segmentation_folder": _segmentation_folder_source,  # images and masks, no captions (LSeg)
}


def get_source(config: ml_collections.ConfigDict, split: str):
    if config.data.source not in TRAIN_SOURCES:
        raise ValueError(f"unknown data.source {config.data.source!r}; choose one of {sorted(TRAIN_SOURCES)}")
    return TRAIN_SOURCES[config.data.source](config, split)


def train_data_identity(config: ml_collections.ConfigDict) -> dict | None:
    """What a checkpoint's data position counts in, for a training source of the user's files: a caption table's
    rows (their count and `CaptionFileSource.digest`; the table is read once per version of the file, so after the
    pipeline has read it this costs the digest alone) or a records set's shards (count, names, and each one's
    version: `data convert` writes a shard again under its name when its input changed, and ArrayRecord's padding
    keeps most sizes, so its report's time of writing where it has one, else its size). None for the sources that
    are functions of the config (shapes) or whose files a method checks itself."""
    source = config.data.source
    if source == "records":
        paths = records.list_shards(config.data.path)
        names = [os.path.basename(p) for p in paths]
        versions = [f"{name} {_shard_version(epath.Path(path))}" for name, path in zip(names, paths, strict=True)]
        return {"shards": len(names), "digest": hashlib.sha256("\n".join(names).encode()).hexdigest(),
                "versions": hashlib.sha256("\n".join(versions).encode()).hexdigest()}
    if source in ("captions", "sharegpt4v"):
        table = get_source(config, "train")
        return {"rows": len(table), "digest": table.digest()}
    return None


def _shard_version(shard: epath.Path) -> str:
    """What changes when `data convert` writes `shard` again: its report's input fingerprint and time, else (a shard
    of another writer, or its reports removed) its size."""
    report = shard.parent / "reports" / f"{shard.name.removesuffix(records.SUFFIX)}.json"
    try:
        stamp = json.loads(report.read_text())
        return json.dumps([stamp.get("input_fingerprint"), stamp.get("finished")], sort_keys=True)
    except (OSError, ValueError, AttributeError):
        return str(shard.stat().length)


def check_train_source(config: ml_collections.ConfigDict) -> None:
    """Opens the training files of a run before anything of it is written, so that a caption table without its
    columns or rows, a folder or other file named as one, or a file that is not a shard is one ConfigError naming
    data.path, and the workdir is left as it was. Records: the shards are listed and the first opened (a set may
    be thousands of remote files; the run opens them all), all of them if that one is empty; with negative captions,
    the first records are read for them."""
    source = config.data.source
    if source not in ("captions", "sharegpt4v", "records"):
        return
    try:
        if source == "records":
            paths = records.list_shards(config.data.path)
            negative = captions.negative_caption_field(config.data)
            first_empty = len(records.open_shards(paths[:1])) == 0
            if first_empty or negative:  # is the whole set empty; do the first records hold negatives
                shards = records.RecordSource(paths if first_empty else paths[:1], negative)
                read, shorts = shards.probe_negatives() if negative else (0, 0)
                if shorts:
                    log.warning("%d of the first %d records have a short caption, which is not trained on with "
                                "negative captions (the negative stands against the caption)", shorts, read)
        else:
            get_source(config, "train")
            if config.data.skip:  # the Long-CLIP recipes' 1,000 (ShareGPT4V-1k) apply to a table of the user's too
                log.warning("data.skip %d: the first %d rows of %s are left out of training (set "
                            "--config.data.skip=0 to train on every row)", config.data.skip, config.data.skip,
                            config.data.path)
    except captions.MissingColumns as e:
        raise ConfigError(f"data.path: {e}; name them with data.image_field and data.caption_field") from None
    except ValueError as e:
        raise ConfigError(f"data.path: {e}") from None


class DecodeExample(grain.transforms.Map):
    """Grain map of the sources with encoded images: an item's `image_bytes` (or the file at `path`) -> `image`, an
    RGB PIL image of any file mode, a JPEG decoded at reduced scale down to `min_side` (`images.open_image`), which
    `TrainExample` crops or resizes to a uint8 array without another copy.

    Returns None, which grain drops, for an item with an `error` (a record or row that does not parse), an empty
    caption, a missing, unreadable, undecodable or truncated image, a path that is not a regular file (a FIFO, a
    device) or a file over `max_bytes` (`images.read_image_file`), or an image whose shorter side is below
    MIN_IMAGE_SIDE: the stream's positions count the drops (`DataCounts`), the log names them (the first 10 examples
    once each, then every 100th drop, per process). Marks a kept example `converted` (a mode other than RGB:
    grayscale, palette, RGBA, CMYK, 16-bit) and `upscaled` (shorter side below `image_size`). A class, so worker
    processes can pickle it."""

    def __init__(self, image_size: int, min_side: int, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
        self.image_size = image_size
        self.min_side = min_side
        self.max_bytes = max_bytes
        self._lock = threading.Lock()  # grain's reader threads share the map
        self._decoded = self._dropped = 0  # this map's own: a data set none of whose first examples decode is an error
        self._named: set[str] = set()  # the examples the log has named (the first 10)

    def __getstate__(self) -> dict:
        return {"image_size": self.image_size, "min_side": self.min_side, "max_bytes": self.max_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def map(self, element: dict) -> dict | None:
        # (a record of another writer than `data convert`, which cleans captions, may hold one of white space only)
        reason = element.get("error") or ("" if (element.get("long_caption") or "").strip() else "empty caption")
        if not reason:
            data = element.get("image_bytes")
            try:
                image, mode = open_image(read_image_file(element["path"], self.max_bytes) if data is None else data,
                                         self.min_side)
            except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt data; a bad sample is never fatal
                reason = decode_error_text(e)
            else:
                w, h = image.size
                if min(h, w) < MIN_IMAGE_SIDE:
                    reason = f"{w}x{h} image, below {MIN_IMAGE_SIDE} px"
        if reason:
            self._drop(element.get("key") or "(no key)", reason)
            return None
        with self._lock:
            self._decoded += 1
        out = {k: v for k, v in element.items() if k not in ("image_bytes", "path", "key", "error")}
        return out | {"image": image, "converted": int(mode != "RGB"), "upscaled": int(min(h, w) < self.image_size)}

    def _drop(self, key: str, reason: str) -> None:
        with self._lock:
            self._dropped += 1
            dropped, all_failed = self._dropped, self._decoded == 0 and self._dropped >= _ALL_FAILED_LIMIT
            # An example met again (a small table's next epoch) is not named again: it said nothing new.
            first_time = key not in self._named and len(self._named) < 10
            if first_time:
                self._named.add(key)
        if first_time or dropped % 100 == 0:
            log.warning("dropping example %s: %s (%d dropped so far in process %d)", key, reason, dropped, os.getpid())
        if all_failed:
            raise ConfigError(f"the first {dropped} examples read have no decodable image or no caption: check "
                              "data.path and data.image_root (a table's image paths are read relative to "
                              "data.image_root, by default the table's own folder; open_clip reads them from the "
                              "current folder: --config.data.image_root=.)")


class TrainExample(grain.transforms.RandomMap):
    """Augments the image and picks the caption of one training example (a class, so worker processes can
    pickle it)."""

    def __init__(self, image_size: int, augment: bool, crop_scale: tuple[float, float], long_caption_prob: float,
                 add_captions: Callable[[dict], dict[str, str]] | None = None, partial_caption_prob: float = 0.0,
                 grayscale_shape_prob: float = 0.0, shuffled_colour_prob: float = 0.0,
                 colour_jitter: Sequence[float] = (0.0, 0.0, 0.0, 0.0), colour_jitter_prob: float = 0.8,
                 add_fields: FieldHook | None = None):
        self.image_size = image_size
        self.augment = augment
        self.crop_scale = tuple(crop_scale)
        self.long_caption_prob = long_caption_prob
        self.add_captions = add_captions  # the method's own captions (`Captions.add`)
        self.partial_caption_prob = partial_caption_prob
        self.grayscale_shape_prob = grayscale_shape_prob
        self.shuffled_colour_prob = shuffled_colour_prob
        # (brightness, contrast, saturation, hue) strengths of `augment.colour_jitter` (all 0: off), applied to an
        # image with that probability
        self.colour_jitter = tuple(float(s) for s in colour_jitter)
        self.colour_jitter_prob = colour_jitter_prob
        # the method's own fields (SLIP's views, AudioCLIP's audio), from the source example, whose `image` is an
        # RGB PIL image where DecodeExample decoded it (images.random_resized_crop takes either)
        self.add_fields = add_fields

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        """The example's `image`, `caption`, the method's added captions and fields, and `stats` (its marks; 0 where
        the source sets none). The method's fields are made from the source example (its image before the crop)
        and draw from the generator last: the rest is what CLIP's example would be."""
        image = element["image"]  # uint8 [H, W, 3], or an RGB PIL image from DecodeExample
        if self.augment:
            image = random_resized_crop(image, self.image_size, rng, self.crop_scale)
        elif isinstance(image, Image.Image) or image.shape[:2] != (self.image_size, self.image_size):
            image = resize_center_crop(image, self.image_size)
        short_key = "short_caption" if "short_caption" in element else "caption"
        long, short = element.get("long_caption"), element.get(short_key)
        partial = element.get("partial_caption")
        draw = rng.random()
        if long is not None and (draw < self.long_caption_prob or short is None):
            caption, picked = long, "long_caption"
        elif partial is not None and draw < self.long_caption_prob + self.partial_caption_prob:
            caption, picked = partial, "partial_caption"
            # The image need not show what the caption does not name, so the features of what it names must work
            # without it, and transfer to colour-shape pairs never seen in training. The draw is made only where it
            # decides something, so that at 0 and 1 the example stream is what it was when graying was a switch.
            kind = element.get("partial_caption_kind")
            p = self.grayscale_shape_prob if kind == "shape" else self.shuffled_colour_prob
            if kind in ("shape", "colour") and p > 0 and (p == 1 or rng.random() < p):
                if kind == "shape":  # no colour: shape features without it
                    image = grayscale(image.astype(np.float32)).round().astype(np.uint8)
                else:  # no shape (the pixels in a random order): colour features without it
                    image = shuffle_pixels(np.asarray(image), rng)
        else:
            caption, picked = short, short_key
        # Drawn after the caption, and only when jitter is on: without it the example stream is what it was before.
        if any(self.colour_jitter) and self.colour_jitter_prob > 0 and rng.random() < self.colour_jitter_prob:
            image = jitter_image(image, rng, self.colour_jitter)
        out = {"image": image, "caption": caption, STATS: {m: element.get(m, 0) for m in _EXAMPLE_MARKS}}
        if (negative := element.get(f"{picked}_negative")) is not None:  # the source's (data.negative_captions)
            if isinstance(negative, tuple | list):  # a caption file's or record's: one, drawn where there is a choice
                negative = negative[int(rng.integers(len(negative)))] if len(negative) > 1 else negative[0]
            out[NEGATIVE_CAPTION] = negative
        if self.add_captions is not None:
            out.update(self.add_captions(element))
        if self.add_fields is not None:
            out.update(self.add_fields(element, rng))
        return out


def _add_example_index(index: int, element: dict) -> dict:
    """Numbers an example by its position in this host's stream (GlobalBatchRows' index), which is absolute across
    epochs and resumes: the positions that no batch holds are the examples dropped."""
    return element | {STATS: element[STATS] | {"example_index": index}}


class Tokenize(grain.transforms.Map):
    """Tokenizes a whole batch of captions at once (the tokenizer is batched, in Rust), marking the captions cut to
    the context (`truncated_caption`; cut as open_clip does, EOT last)."""

    def __init__(self, tokenizer: ClipTokenizer, fields: Mapping[str, TextField]):
        self.tokenizer = tokenizer
        self.fields = dict(fields)

    def map(self, batch: dict) -> dict:
        # The picked caption is dropped even when no field tokenizes it (a method trained on masks alone).
        captions = {"caption", NEGATIVE_CAPTION, *(caption for caption, _ in self.fields.values())}
        out = {k: v for k, v in batch.items() if k not in captions}  # images, a method's fields, stats
        for name, (caption, length) in self.fields.items():
            if name == "text":
                out[name], lengths = self.tokenizer.tokenize_with_lengths(list(batch[caption]), length)
                out[STATS] = out[STATS] | {"truncated_caption": (lengths > length - 2).astype(np.int64)}
            else:
                out[name] = self.tokenizer(list(batch[caption]), length)
        if "text" not in self.fields:  # no caption is cut
            out[STATS] = out[STATS] | {"truncated_caption": np.zeros(len(out[STATS]["converted"]), np.int64)}
        return out


class DataCounts:
    """The loop's data metrics, from the `stats` of the batches this host consumed: `data_dropped`, the examples
    dropped since step 0 (positions no batch held: across resumes too, since the positions are absolute; with W
    worker processes a batch holds every W-th position, from its worker's share, so the count runs ahead between steps
    that are multiples of W and is close, not exact, at them: docs/data.md), and `data_<mark>` for each of MARKS, the
    marked examples since the last log. Each process counts its own rows; `metrics` sums over processes."""

    def __init__(self):
        self._window = dict.fromkeys(MARKS, 0)
        self._end = 0  # one past the position of the last example consumed
        self._rows = 0  # examples per batch on this host

    def take(self, batch: dict) -> dict:
        """`batch` without its host-only `stats`, which are counted: what goes to the device."""
        stats = batch.pop(STATS)
        for mark in MARKS:
            self._window[mark] += int(stats[mark].sum())
        self._end = int(stats["example_index"][-1]) + 1
        self._rows = len(stats["example_index"])
        return batch

    def metrics(self, steps: int) -> dict[str, int]:
        """The metrics after `steps` steps (one batch each) over all processes, which must all call it at the same
        step (a collective); the window starts anew."""
        dropped = self._end - steps * self._rows
        totals = sum_over_processes(np.array([dropped, *self._window.values()], np.int64))
        self._window = dict.fromkeys(MARKS, 0)
        return {"data_dropped": int(totals[0])} | {f"data_{m}": int(t) for m, t in zip(MARKS, totals[1:], strict=True)}


def clip_captions(config: ml_collections.ConfigDict) -> Captions:
    """CLIP's captions: `text`, the picked caption at the model's context length."""
    return Captions({"text": TextField("caption", config.model.text.context_length)})


def train_dataset(config: ml_collections.ConfigDict, tokenizer: ClipTokenizer, rows: Sequence[int] | None = None,
                  captions: Captions | None = None,
                  fields: FieldHook | None = None
                  ) -> grain.IterDataset:
    """The training stream of this host: infinite (files repeat), deterministic given config.seed. `rows`: the rows
    of each global batch this host loads (default: its contiguous block; see `distributed.batch_rows`); `captions`:
    the method's (default: CLIP's, `clip_captions`); `fields`: the method's extra fields of an example, made from the
    source example with the example's generator (`TrainExample`'s `add_fields`)."""
    rows = batch_rows(config.batch_size) if rows is None else rows
    captions = clip_captions(config) if captions is None else captions
    source = get_source(config, "train")
    if config.data.source != "shapes" and len(source) < config.batch_size:
        log.warning("data.path holds %d examples, fewer than batch_size %d: every batch repeats pairs, which the "
                    "contrastive loss takes as negatives of each other; use a smaller batch or more data",
                    len(source), config.batch_size)
    ds = grain.MapDataset.source(source)
    if config.data.source != "shapes":  # procedural samples are already i.i.d. by index; files need shuffling
        ds = ds.shuffle(seed=config.seed).repeat()
    encoded = getattr(source, "encoded_images", False)
    if encoded:  # decoded in the grain map, at the resolution the crop needs
        size, d = config.model.vision.image_size, config.data
        ds = ds.map(DecodeExample(size, crop_min_side(size, d.augment, d.crop_scale), d.max_image_bytes))
    ds = ds.random_map(
        TrainExample(
            config.model.vision.image_size, config.data.augment, config.data.crop_scale, config.data.long_caption_prob,
            add_captions=captions.add, partial_caption_prob=config.data.partial_caption_prob,
            grayscale_shape_prob=config.data.grayscale_shape_prob,
            shuffled_colour_prob=config.data.shuffled_colour_prob, colour_jitter=config.data.colour_jitter,
            colour_jitter_prob=config.data.colour_jitter_prob, add_fields=fields,
        ),
        seed=config.seed,
    )
    ds = GlobalBatchRows(ds, rows, config.batch_size).map_with_index(_add_example_index)
    if encoded:
        # A bad example is dropped (the map returns None): grain batches such a sparse dataset only after reading
        # it, so here the threads prefetch examples, and batches are stacked as they are consumed.
        batch = len(rows)
        read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=config.data.prefetch * batch)
        iter_ds = ds.to_iter_dataset(read).batch(batch, drop_remainder=True)
        iter_ds = iter_ds.map(Tokenize(tokenizer, captions.fields))
    else:
        ds = ds.batch(len(rows), drop_remainder=True)
        ds = ds.map(Tokenize(tokenizer, captions.fields))
        # Batches are assembled by a few threads ahead of the step (numpy and PIL release the GIL); worker
        # processes for heavier decoding are opt-in.
        iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=config.data.prefetch))
    if config.data.workers > 0:
        # grain's worker processes read absl flags; our CLI uses argparse, so mark them parsed (defaults).
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.workers),
                                      worker_init_fn=leave_stop_signals_to_the_trainer)
    return iter_ds


def leave_stop_signals_to_the_trainer(worker_index: int, worker_count: int) -> None:
    """Run in each grain worker process. SIGTERM and SIGINT often reach every process of the trainer's group (SLURM's
    scancel and time limit, a terminal's Ctrl-C, `kill -TERM -PGID`); a worker they killed made the trainer's next
    batch an error, so the run crashed where it should have saved a checkpoint. The trainer answers them (a save
    after its step) and stops the workers itself when it closes the iterator (grain: an event, then SIGKILL). Not
    covered: a signal in the seconds a worker is starting (the run's first batch), before this runs; grain starts
    the workers from threads of its own, so they cannot be started with the signals blocked.
    A trainer that ends without closing the iterator (a Ctrl-C while compiling, a second Ctrl-C: `os._exit`) leaves
    the worker an orphan that the signals no longer stop: it exits once its parent is gone."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    trainer = os.getppid()

    def exit_with_the_trainer() -> None:
        while os.getppid() == trainer:  # an orphan is handed to init (or a subreaper): another parent
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=exit_with_the_trainer, name="exit-with-the-trainer", daemon=True).start()


def train_iterator(config: ml_collections.ConfigDict, tokenizer: ClipTokenizer, rows: Sequence[int] | None = None,
                   captions: Captions | None = None,
                   fields: FieldHook | None = None
                   ) -> Iterator[dict]:
    return iter(train_dataset(config, tokenizer, rows, captions, fields))


def _example_stats(element: dict) -> dict:
    return element | {STATS: dict.fromkeys(MARKS, 0)}


def array_iterator(arrays: Mapping[str, np.ndarray], batch_size: int, rows: Sequence[int], seed: int
                   ) -> Iterator[dict]:
    """Batches of in-memory examples (e.g. a few-shot sample's cached embeddings and labels): `arrays` hold N rows
    each; every epoch is a new permutation fixed by `seed`; this host gets the rows `rows` of each global batch, with
    the `stats` the loop counts (nothing is dropped or marked). Checkpointable like the caption pipeline."""
    n = len(next(iter(arrays.values())))
    ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat()
    ds = ds.map(lambda i: _example_stats({k: v[i] for k, v in arrays.items()}))
    ds = GlobalBatchRows(ds, rows, batch_size).map_with_index(_add_example_index).batch(len(rows), drop_remainder=True)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))


def tokenizer_corpus(config: ml_collections.ConfigDict, n: int = 3000) -> list[str]:
    """Training captions to fit a from-scratch BPE vocabulary on (both caption kinds, as training may use both): of
    `n` examples, spread over a caption table (read whole already: a table sorted by language or topic gave a
    vocabulary of its first rows alone), the first ones of records (each read costs a request on a bucket) and of
    shapes."""
    source = get_source(config, "train")
    read = getattr(source, "captions", source.__getitem__)  # shapes draws its captions without the images
    indices: Sequence[int] = range(n)
    if config.data.source in ("captions", "sharegpt4v") and len(source) > n:
        indices = np.linspace(0, len(source) - 1, n).round().astype(int).tolist()
    texts = []
    for i in indices:
        item = read(i)
        texts.extend(item[k] for k in ("short_caption", "long_caption", "partial_caption", "caption") if item.get(k))
    return texts


def train_tokenizer(config: ml_collections.ConfigDict) -> ClipTokenizer:
    """`data.tokenizer="train"`: a BPE vocabulary of data.tokenizer_vocab_size fitted on the training captions."""
    return ClipTokenizer.train(tokenizer_corpus(config), config.data.tokenizer_vocab_size)


def tokenizer_from_file(path: str) -> ClipTokenizer:
    """`data.tokenizer` naming a file: a clip_jax tokenizer.json, or a BPE merges file (OpenAI's
    bpe_simple_vocab_16e6.txt.gz or one like it). Anything else is a ConfigError naming it."""
    try:
        return ClipTokenizer.load(path) if str(path).endswith(".json") else ClipTokenizer.from_openai_vocab(path)
    except (ValueError, KeyError, UnicodeDecodeError, OSError, EOFError) as e:  # json, gzip and BPE errors
        raise ConfigError(f"data.tokenizer: {path} is not a tokenizer ({one_line(e)}); give a tokenizer.json of a "
                          "clip_jax workdir, a BPE merges file, 'openai' or 'train'") from None


def check_tokenizer_file(config: ml_collections.ConfigDict, new_run: bool = False) -> ClipTokenizer | None:
    """Reads a tokenizer file that `data.tokenizer` names before the run writes anything (`tokenizer_from_file`).
    A `new_run` (the workdir holds no checkpoint: it will make tokenizer.json from this setting) also gets OpenAI's
    vocabulary found and a vocabulary larger than the model's refused now, not after the workdir is made. Returns
    the tokenizer it read, for `make_tokenizer` (None where it read none)."""
    choice = config.data.tokenizer
    if choice == "train":  # its size is data.tokenizer_vocab_size, or a warm start's
        return None
    if choice != "openai":
        tokenizer = tokenizer_from_file(choice)
    elif new_run:
        tokenizer = _openai_tokenizer()
    else:
        return None
    if new_run:
        _check_vocab_fits(tokenizer, config)
    return tokenizer


def _openai_tokenizer() -> ClipTokenizer:
    vocab = ClipTokenizer.find_openai_vocab()
    if vocab is None:
        raise FileNotFoundError("data.tokenizer='openai' needs bpe_simple_vocab_16e6.txt.gz: install open-clip-torch "
                                "(pip install open-clip-torch) or set data.tokenizer to the file's path")
    return ClipTokenizer.from_openai_vocab(vocab)


def _check_vocab_fits(tokenizer: ClipTokenizer, config: ml_collections.ConfigDict) -> None:
    if tokenizer.vocab_size > config.model.text.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.text.vocab_size is "
            f"{config.model.text.vocab_size}; set --config.model.text.vocab_size={tokenizer.vocab_size}"
        )


def _tokenizer_of(config: ml_collections.ConfigDict) -> ClipTokenizer:
    """A tokenizer that is a function of `data.tokenizer` alone: the OpenAI BPE, or a file's."""
    return _openai_tokenizer() if config.data.tokenizer == "openai" else tokenizer_from_file(config.data.tokenizer)


def make_tokenizer(config: ml_collections.ConfigDict, workdir: pathlib.Path, new_run: bool = False,
                   checked: ClipTokenizer | None = None, reader: bool = False) -> ClipTokenizer:
    """The workdir's tokenizer (`tokenizer.json`); created on the first run from `config.data.tokenizer`, or taken
    as `checked`, what `check_tokenizer_file` read of that setting. A `new_run` (no checkpoint yet) creates it again:
    a file there is a failed launch's, whose settings the user may have corrected since. A trained run without it
    is refused when its vocabulary was fitted to its captions (another fit need not give the ids its model learnt);
    one of the OpenAI BPE or a file is made again, and a `reader` (eval, encode, ...) writes nothing."""
    path = workdir / "tokenizer.json"
    exists = path.exists() and not new_run
    if not exists and not new_run and config.data.tokenizer == "train":
        raise ConfigError(f"{workdir} has checkpoints and no tokenizer.json: its model's token ids come from the "
                          "vocabulary that run fitted to its captions, which another fit need not reproduce; put "
                          "its tokenizer.json back (from a copy of the workdir)")
    if not exists and reader:
        return checked if checked is not None else _tokenizer_of(config)
    # Process 0 creates the file and the others then read it: every host uses the same vocabulary, and no host
    # looks for the file while it is being written.
    barrier("tokenizer.json looked up")
    if exists or jax.process_index() > 0:
        if not exists:
            barrier("tokenizer.json written")
        tokenizer = ClipTokenizer.load(path)
    else:
        choice = config.data.tokenizer
        start = epath.Path(config.init_from) / "tokenizer.json" if config.init_from else None
        if choice == "train" and start is not None and start.exists():
            # A warm start from another run reads that run's token ids: a vocabulary fitted anew would scramble them.
            tokenizer = ClipTokenizer.load(start)
        elif choice == "train":
            tokenizer = train_tokenizer(config)
        else:
            tokenizer = checked if checked is not None else _tokenizer_of(config)
        tokenizer.save(path)
        barrier("tokenizer.json written")
    _check_vocab_fits(tokenizer, config)
    return tokenizer
