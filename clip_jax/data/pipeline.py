"""grain input pipelines: deterministic, sharded per host, checkpointable.

train: source -> random map (augment, pick caption) -> this host's rows of each global batch -> batch -> tokenize
-> prefetch. Shuffling and the random map are keyed by the global example index, so global batch k holds the same
examples in the same order on any number of hosts.
Elements of a batch: `image` uint8 [B, H, W, 3] (normalised on device) and `text` int32 [B, context_length]; for a
loss that reads short captions (Long-CLIP) also `short_text` int32 [B, short_text_length(config)].
Sources are registered by name in `TRAIN_SOURCES`; each returns a random-access source whose items have `image`
(uint8 HxWx3) and the caption fields.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator, Sequence

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from clip_jax.data import captions, records
from clip_jax.data.images import random_resized_crop, resize_center_crop
from clip_jax.data.shapes import ShapesConfig, ShapesDataset
from clip_jax.data.tokenizer import ClipTokenizer
from clip_jax.distributed import GlobalBatchRows, barrier, batch_rows
from clip_jax.longclip import first_sentence
from clip_jax.losses import SHORT_TEXT_LOSSES


def shapes_config(config: ml_collections.ConfigDict) -> ShapesConfig:
    return ShapesConfig(
        image_size=config.model.vision.image_size,
        min_objects=config.data.min_objects,
        max_objects=config.data.max_objects,
        seed=config.seed,
    )


def _shapes_source(config: ml_collections.ConfigDict, split: str):
    return ShapesDataset(shapes_config(config), split)


def _file_source(reader):
    def make(config: ml_collections.ConfigDict, split: str):
        if split != "train":
            raise ValueError(f"data.source {config.data.source!r} has only a train split, not {split!r}")
        d = config.data
        return captions.file_source(reader, d.path, d.image_root, config.model.vision.image_size, d.skip)

    return make


TRAIN_SOURCES: dict[str, Callable[[ml_collections.ConfigDict, str], object]] = {
    "shapes": _shapes_source,
    "sharegpt4v": _file_source(captions.read_sharegpt4v),
    "captions": _file_source(captions.read_captions),
    "records": records.records_source,  # ArrayRecord shards written by `clip-jax data convert` (docs/data.md)
}


def get_source(config: ml_collections.ConfigDict, split: str):
    if config.data.source not in TRAIN_SOURCES:
        raise ValueError(f"unknown data.source {config.data.source!r}; choose one of {sorted(TRAIN_SOURCES)}")
    return TRAIN_SOURCES[config.data.source](config, split)


class TrainExample(grain.transforms.RandomMap):
    """Augments the image and picks the caption of one training example (a class, so worker processes can
    pickle it)."""

    def __init__(self, image_size: int, augment: bool, crop_scale: tuple[float, float], long_caption_prob: float,
                 short_caption: bool = False, partial_caption_prob: float = 0.0,
                 grayscale_shape_captions: bool = False):
        self.image_size = image_size
        self.augment = augment
        self.crop_scale = tuple(crop_scale)
        self.long_caption_prob = long_caption_prob
        self.short_caption = short_caption  # also emit the short caption (Long-CLIP)
        self.partial_caption_prob = partial_caption_prob
        self.grayscale_shape_captions = grayscale_shape_captions

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image = element["image"]
        if self.augment:
            image = random_resized_crop(image, self.image_size, rng, self.crop_scale)
        elif image.shape[:2] != (self.image_size, self.image_size):
            image = resize_center_crop(image, self.image_size)
        long, short = element.get("long_caption"), element.get("short_caption", element.get("caption"))
        partial = element.get("partial_caption")
        draw = rng.random()
        if long is not None and (draw < self.long_caption_prob or short is None):
            caption = long
        elif partial is not None and draw < self.long_caption_prob + self.partial_caption_prob:
            caption = partial
            if self.grayscale_shape_captions and element.get("partial_caption_kind") == "shape":
                # The caption names no colour, so the image need not show one: shape features must then work
                # without colour, and transfer to colour-shape pairs never seen in training.
                gray = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
                image = np.repeat(gray[..., None], 3, axis=-1).round().astype(np.uint8)
        else:
            caption = short
        out = {"image": image, "caption": caption}
        if self.short_caption:
            out["short_caption"] = short if short is not None else first_sentence(long)
        return out


class Tokenize(grain.transforms.Map):
    """Tokenizes a whole batch of captions at once (the tokenizer is batched, in Rust)."""

    def __init__(self, tokenizer: ClipTokenizer, context_length: int, short_context_length: int | None = None):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.short_context_length = short_context_length

    def map(self, batch: dict) -> dict:
        out = {"image": batch["image"], "text": self.tokenizer(list(batch["caption"]), self.context_length)}
        if self.short_context_length is not None:
            out["short_text"] = self.tokenizer(list(batch["short_caption"]), self.short_context_length)
        return out


def short_text_length(config: ml_collections.ConfigDict) -> int | None:
    """Token length of the batches' `short_text`, or None when the loss reads no short captions."""
    if config.loss.name not in SHORT_TEXT_LOSSES:
        return None
    return min(config.data.short_context_length, config.model.text.context_length)


def train_dataset(config: ml_collections.ConfigDict, tokenizer: ClipTokenizer, rows: Sequence[int] | None = None
                  ) -> grain.IterDataset:
    """The training stream of this host: infinite (files repeat), deterministic given config.seed. `rows`: the rows
    of each global batch this host loads (default: its contiguous block; see `distributed.batch_rows`)."""
    rows = batch_rows(config.batch_size) if rows is None else rows
    source = get_source(config, "train")
    ds = grain.MapDataset.source(source)
    if config.data.source != "shapes":  # procedural samples are already i.i.d. by index; files need shuffling
        ds = ds.shuffle(seed=config.seed).repeat()
    decode = getattr(source, "decode", None)  # sources of encoded images (records) decode in the grain map
    if decode is not None:
        ds = ds.map(decode)
    short_length = short_text_length(config)
    ds = ds.random_map(
        TrainExample(
            config.model.vision.image_size, config.data.augment, config.data.crop_scale, config.data.long_caption_prob,
            short_caption=short_length is not None, partial_caption_prob=config.data.partial_caption_prob,
            grayscale_shape_captions=config.data.grayscale_shape_captions,
        ),
        seed=config.seed,
    )
    ds = GlobalBatchRows(ds, rows, config.batch_size)
    if decode is not None:
        # An undecodable image is dropped (the map returns None): grain batches such a sparse dataset only after
        # reading it, so here the threads prefetch examples, and batches are stacked as they are consumed.
        batch = len(rows)
        read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=config.data.prefetch * batch)
        iter_ds = ds.to_iter_dataset(read).batch(batch, drop_remainder=True)
        iter_ds = iter_ds.map(Tokenize(tokenizer, config.model.text.context_length, short_length))
    else:
        ds = ds.batch(len(rows), drop_remainder=True)
        ds = ds.map(Tokenize(tokenizer, config.model.text.context_length, short_length))
        # Batches are assembled by a few threads ahead of the step (numpy and PIL release the GIL); worker
        # processes for heavier decoding are opt-in.
        iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=config.data.prefetch))
    if config.data.workers > 0:
        # grain's worker processes read absl flags; our CLI uses argparse, so mark them parsed (defaults).
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.workers))
    return iter_ds


def train_iterator(config: ml_collections.ConfigDict, tokenizer: ClipTokenizer, rows: Sequence[int] | None = None
                   ) -> Iterator[dict]:
    return iter(train_dataset(config, tokenizer, rows))


def tokenizer_corpus(config: ml_collections.ConfigDict, n: int = 3000) -> list[str]:
    """Training captions to fit a from-scratch BPE vocabulary on (both caption kinds, as training may use both)."""
    source = get_source(config, "train")
    texts = []
    for i in range(n):
        item = source[i]
        texts.extend(item[k] for k in ("short_caption", "long_caption", "partial_caption", "caption") if k in item)
    return texts


def make_tokenizer(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> ClipTokenizer:
    """The workdir's tokenizer (`tokenizer.json`); created on the first run from `config.data.tokenizer`."""
    path = workdir / "tokenizer.json"
    exists = path.exists()
    # Process 0 creates the file and the others then read it: every host uses the same vocabulary, and no host
    # looks for the file while it is being written.
    barrier("tokenizer.json looked up")
    if exists or jax.process_index() > 0:
        if not exists:
            barrier("tokenizer.json written")
        tokenizer = ClipTokenizer.load(path)
    else:
        choice = config.data.tokenizer
        if choice == "train":
            tokenizer = ClipTokenizer.train(tokenizer_corpus(config), config.data.tokenizer_vocab_size)
        elif choice == "openai":
            vocab = ClipTokenizer.find_openai_vocab()
            if vocab is None:
                raise FileNotFoundError(
                    "data.tokenizer='openai' needs bpe_simple_vocab_16e6.txt.gz: install open-clip-torch "
                    "(pip install open-clip-torch) or set data.tokenizer to the file's path"
                )
            tokenizer = ClipTokenizer.from_openai_vocab(vocab)
        elif choice.endswith(".json"):
            tokenizer = ClipTokenizer.load(choice)
        else:
            tokenizer = ClipTokenizer.from_openai_vocab(choice)
        tokenizer.save(path)
        barrier("tokenizer.json written")
    if tokenizer.vocab_size > config.model.text.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.text.vocab_size is "
            f"{config.model.text.vocab_size}; set --config.model.text.vocab_size={tokenizer.vocab_size}"
        )
    return tokenizer
