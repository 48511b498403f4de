"""Long-text evaluation (Long-CLIP): retrieval with captions longer than CLIP's 77 tokens, and the hard-pairs test.

- `load_long_text_set`: images and their captions, from a folder in the Urban-1k layout (Long-CLIP's benchmark:
  `image/<name>.jpg` and `caption/<name>.txt`, the caption on the file's first line), a JSON file {image file name:
  caption}, or a caption table as training reads one (.csv, .tsv or .jsonl with `image` and `caption` columns; rows
  may share an image, as COCO's five captions do). Image names are relative to the file's folder. Undecodable
  images are skipped and counted.
- `shapes_long_captions`: `shapes` test scenes of 5-9 objects whose long caption is longer than 77 tokens.
- `hard_pairs`: `shapes` scenes paired with a twin that differs in one object only, described after token 77 (and
  within token 248) of the long caption: a model that reads 77 tokens sees the same text for both and scores 0 on
  `hard_pairs_accuracy`; only a model that reads past token 77 can tell them apart.

The functions take embeddings or data, not a model, like `zero_shot` and `retrieval`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import numpy as np

from clip_jax.data.captions import caption_text, read_table, table_format, text_lines
from clip_jax.data.images import DEFAULT_MAX_IMAGE_BYTES, load_images
from clip_jax.data.shapes import COLOURS, ShapesConfig, ShapesDataset, describe_scene
from clip_jax.data.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

CLIP_CONTEXT = 77  # what "long" is measured against: CLIP's context length
LONG_CONTEXT = 248  # Long-CLIP's: hard pairs differ within it, so every model is scored on the same pairs
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")  # caption tables (`captions.table_format`)
LONG_SCENE_OBJECTS = (5, 9)  # objects per scene: 5 already give ~110-140 tokens, 9 at most ~230 (under 248)


class _Twice(Exception):  # noqa: N818 - the key a JSON object repeats
    pass


def _once_each(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's dict, or _Twice for a key it holds twice (json keeps the last silently)."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _Twice(key)
        seen[key] = value
    return seen


def long_text_pairs(path: str | pathlib.Path, image_root: str = "") -> list[tuple[pathlib.Path, str]]:
    """(image path, caption) of each pair of an Urban-1k-layout folder or a JSON file {image file name: caption}
    (names relative to its folder), read without any image; a ValueError, one line naming the file, for one that
    cannot be read as such."""
    path = pathlib.Path(path)
    if path.is_dir():
        if not (path / "caption").is_dir():
            raise FileNotFoundError(f"{path} is not in the Urban-1k layout (image/<name>.jpg, caption/<name>.txt)")
        pairs = []
        for f in sorted((path / "caption").glob("*.txt")):
            try:
                lines = text_lines(f.read_text(encoding="utf-8-sig"))
            except UnicodeDecodeError as e:
                raise ValueError(f"{f}: not UTF-8 text (byte {e.object[e.start]:#04x}); save it as UTF-8") from None
            if not lines or not lines[0].strip():
                raise ValueError(f"{f}: its first line, the caption, is empty; write the caption there")
            pairs.append((path / "image" / f"{f.stem}.jpg", lines[0]))
        return pairs
    if path.suffix.lower() in TABLE_SUFFIXES:
        return _table_pairs(path, image_root)
    if image_root:
        raise ValueError(f"{path}: image_root is for a caption table's image paths; an Urban-1k folder's and a JSON "
                         "file's images are found beside it: drop image_root")
    if path.suffix != ".json":
        raise FileNotFoundError(f"{path}: expected an Urban-1k-layout folder, a JSON file of image -> caption or a "
                                f"caption table ({', '.join(TABLE_SUFFIXES)})")
    try:
        data = json.loads(path.read_text("utf-8-sig"), object_pairs_hook=_once_each)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a JSON file ({e}); give a JSON object {{image file name: caption}}") from None
    except _Twice as e:
        raise ValueError(f"{path} names image {e.args[0]!r} twice: a JSON object keeps the last of its captions only; "
                         "give each image one caption") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object {{image file name: caption}} (a "
                         "ShareGPT4V list trains with data.source 'sharegpt4v'; its evaluation is a JSON object)")
    if bad := next((name for name, caption in data.items() if not isinstance(caption, str) or not caption.strip()),
                   None):
        raise ValueError(f"{path}: the caption of {bad!r} is {data[bad]!r}, not a text; give each image one caption")
    return [(path.parent / name, caption) for name, caption in data.items()]


def _table_pairs(path: pathlib.Path, image_root: str = "") -> list[tuple[pathlib.Path, str]]:
    """(image path, caption) of each row of a caption table, read as training reads one (`captions.read_table`; image
    paths relative to `image_root`, else the table's folder); a row without an image or a caption is refused, naming
    it: an evaluation scores every row it is given."""
    try:
        rows = read_table(str(path), table_format(str(path)), image_root or None)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x}); save it as UTF-8") from None
    pairs = []
    for number, row in enumerate(rows, 1):
        caption, _ = caption_text(row.caption)
        if row.problem or not caption:
            what = f"({row.key}: {row.problem})" if row.problem else f"(image {row.key}) has no caption"
            raise ValueError(f"{path}: row {number} {what}; give each row an image and a caption")
        pairs.append((pathlib.Path(row.image), caption))
    if not pairs:
        raise ValueError(f"{path} holds no row; give one row per image-caption pair (columns image, caption)")
    return pairs


def load_long_text_set(path: str | pathlib.Path, image_size: int, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                       image_root: str = "") -> tuple[np.ndarray, list[str], np.ndarray, int]:
    """(images uint8 [N, S, S, 3], captions [M], the image index of each caption int64 [M], number of images skipped:
    unreadable, undecodable, not regular files or over `max_image_bytes`) of `long_text_pairs(path)`; an image named
    by several pairs is read once."""
    pairs = long_text_pairs(path, image_root)
    index: dict[pathlib.Path, int] = {}
    for image, _ in pairs:
        index.setdefault(image, len(index))
    # a missing or corrupt image costs its captions, not the evaluation
    images, kept, skipped = load_images(list(index), image_size, max_image_bytes)
    for message in skipped:
        log.warning("skipping %s", message)
    if not images:
        where = pathlib.Path(path)
        where = where if where.is_dir() else image_root or f"{where.parent}, the file's folder,"
        raise ValueError(f"{path}: no readable image-caption pair (the images are looked for in {where} by name)")
    position = {image_index: i for i, image_index in enumerate(kept)}  # of the images read
    captions = [(caption, position[index[image]]) for image, caption in pairs if index[image] in position]
    return (np.stack(images), [c for c, _ in captions], np.asarray([i for _, i in captions], np.int64),
            len(skipped))


def _token_count(tokenizer: ClipTokenizer, text: str) -> int:
    return len(tokenizer.encode(text)) + 2  # with SOT and EOT


def _long_scenes(image_size: int, seed: int) -> ShapesDataset:
    low, high = LONG_SCENE_OBJECTS
    return ShapesDataset(ShapesConfig(image_size=image_size, min_objects=low, max_objects=high, seed=seed), "test")


def shapes_long_captions(image_size: int, seed: int, n: int, tokenizer: ClipTokenizer
                         ) -> tuple[np.ndarray, list[str]]:
    """Images and long captions of the first `n` test scenes of 5-9 objects, keeping those whose caption is longer
    than 77 tokens (nearly all)."""
    source = _long_scenes(image_size, seed)
    items = [source[i] for i in range(n)]
    items = [it for it in items if _token_count(tokenizer, it["long_caption"]) > CLIP_CONTEXT]
    return np.stack([it["image"] for it in items]), [it["long_caption"] for it in items]


def hard_pairs(image_size: int, seed: int, n_pairs: int, tokenizer: ClipTokenizer,
               context_length: int = LONG_CONTEXT) -> tuple[np.ndarray, list[str]]:
    """`n_pairs` (scene, twin) pairs as images [2 n_pairs, S, S, 3] and long captions, pair k at rows 2k, 2k + 1.

    The twin recolours one non-salient object. Both captions are drawn with the same phrasing seed, so they differ
    in that colour word only; the object is one whose colour falls after token 77 and within `context_length`
    tokens (the two captions tokenize identically at 77 tokens, differently at `context_length`), the one described
    last if several do. Scenes without such an object are passed over."""
    source = _long_scenes(image_size, seed)
    rng = np.random.default_rng([seed, CLIP_CONTEXT])
    images, captions = [], []
    index = 0
    while len(captions) < 2 * n_pairs:
        if index >= 50 * n_pairs + 100:
            raise RuntimeError(f"found only {len(captions) // 2} hard pairs in {index} scenes")
        scene, caption_seed = source.scene(index), index
        index += 1
        caption = describe_scene(scene, np.random.default_rng(caption_seed))[1]
        twins = []  # (sentence index of the recoloured object, twin scene)
        for i, obj in enumerate(scene.objects):
            if obj is scene.salient:
                continue
            colour = COLOURS[(COLOURS.index(obj.colour) + 1 + rng.integers(len(COLOURS) - 1)) % len(COLOURS)]
            objects = list(scene.objects)
            objects[i] = dataclasses.replace(obj, colour=colour)
            twin = dataclasses.replace(scene, objects=tuple(objects))
            texts = [caption, describe_scene(twin, np.random.default_rng(caption_seed))[1]]
            short, full = tokenizer(texts, CLIP_CONTEXT), tokenizer(texts, context_length)
            if np.array_equal(short[0], short[1]) and not np.array_equal(full[0], full[1]):
                sentences = zip(texts[0].split(". "), texts[1].split(". "), strict=True)
                twins.append((next(j for j, (a, b) in enumerate(sentences) if a != b), twin))
        if not twins:
            continue
        pair = [source.render(scene, caption_seed), source.render(max(twins, key=lambda t: t[0])[1], caption_seed)]
        images += [p["image"] for p in pair]
        captions += [p["long_caption"] for p in pair]
    return np.stack(images), captions


def hard_pairs_accuracy(image_embeds: np.ndarray, text_embeds: np.ndarray) -> dict[str, float]:
    """Scores of `hard_pairs` embeddings: "pairs", the fraction of pairs where each image's own caption scores above
    its twin's caption; "images", the fraction of images whose own caption scores above the twin's (a tie counts
    one half). A model blind to the difference, in the text (e.g. reading 77 tokens) or in the images, scores 0 and
    exactly 0.5: both images then prefer the same caption, or tie."""
    image_embeds = np.asarray(image_embeds, np.float32)
    n, dim = image_embeds.shape
    if n % 2:
        raise ValueError(f"hard pairs come in twos; got {n} images")
    scores = np.einsum("npd,nqd->npq", image_embeds.reshape(n // 2, 2, dim),
                       np.asarray(text_embeds, np.float32).reshape(n // 2, 2, dim))
    own, twin = scores[:, [0, 1], [0, 1]], scores[:, [0, 1], [1, 0]]
    return {"pairs": float(np.mean((own > twin).all(axis=1))),
            "images": float(np.mean((own > twin) + 0.5 * (own == twin)))}
