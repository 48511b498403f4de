"""Image-caption files as training sources: ShareGPT4V's JSON (Long-CLIP's training set), JSONL and CSV.

- ShareGPT4V (`data.source = "sharegpt4v"`): a JSON list of {"image": relative path, "conversations": [{"from":
  "human", ...}, {"from": "gpt", "value": long caption}]}; the caption is the first "gpt" turn.
- JSONL / CSV (`data.source = "captions"`, by the file's suffix): one {"image": path, "caption": text[,
  "short_caption": text]} object per line, or a CSV with a header row naming the columns image, caption[,
  short_caption]. `caption` is the long caption; a missing short one is the long one's first sentence (Long-CLIP).

Newlines in captions become spaces (as Long-CLIP's loader does, so that the first sentence ends at ". ").
Images are read with `load_image` at the model's resolution, in the grain map (`CaptionFileSource.decode`, as
for record shards): a missing or undecodable image drops its record, counted and logged, never fatal.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import pathlib
import threading

import grain

from clip_jax.data.images import load_image

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Record:
    image: str  # path relative to the image root (or absolute)
    long_caption: str
    short_caption: str | None = None


def _clean(caption: str) -> str:
    return caption.replace("\n", " ").strip()


def read_sharegpt4v(path: str | pathlib.Path) -> list[Record]:
    """Records of a ShareGPT4V JSON file, in file order."""
    records = []
    for i, entry in enumerate(json.loads(pathlib.Path(path).read_text(encoding="utf-8"))):
        turns = [t.get("value") for t in entry.get("conversations", ()) if t.get("from") == "gpt"]
        if "image" not in entry or not turns or not isinstance(turns[0], str):
            raise ValueError(f"{path}: record {i} has no 'image' or no 'gpt' turn with a caption")
        records.append(Record(entry["image"], _clean(turns[0])))
    return records


def read_captions(path: str | pathlib.Path) -> list[Record]:
    """Records of a JSONL (`.jsonl`) or CSV (`.csv`) file with fields image, caption[, short_caption]."""
    path = pathlib.Path(path)
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    elif path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"{path}: caption files are .jsonl or .csv")
    records = []
    for i, row in enumerate(rows):
        if not row.get("image") or not row.get("caption"):
            raise ValueError(f"{path}: row {i} needs 'image' and 'caption'")
        short = row.get("short_caption")
        records.append(Record(row["image"], _clean(row["caption"]), _clean(short) if short else None))
    return records


class LoadImage(grain.transforms.Map):
    """Grain map: an item's image `path` -> `image` (`load_image` at the model's resolution), or None, which grain
    drops, when the file is missing or cannot be decoded (counted in `failures` and logged). A class, so grain's
    worker processes can pickle it; each process counts its own."""

    def __init__(self, image_size: int):
        self.image_size = image_size
        self.failures = 0
        self.loaded = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"image_size": self.image_size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["image_size"])

    def map(self, element: dict) -> dict | None:
        try:
            image = load_image(element["path"], self.image_size)
        except ValueError as e:
            with self._lock:
                self.failures += 1
                failures, nothing_loaded = self.failures, self.loaded == 0
            log.warning("dropping %s (%d undecodable images so far)", e, failures)
            if nothing_loaded and failures >= _ALL_FAILED_LIMIT:  # else grain would spin on a repeated set forever
                raise ValueError(f"the first {failures} images read cannot be decoded: check data.image_root") from None
            return None
        with self._lock:
            self.loaded += 1
        return {k: v for k, v in element.items() if k != "path"} | {"image": image}


_ALL_FAILED_LIMIT = 100


class CaptionFileSource:
    """Random-access source (for `grain.MapDataset.source`) of records: items {"path", "long_caption"[,
    "short_caption"]}, whose images `self.decode` loads in the grain map. Indices wrap around (the tokenizer
    corpus reads a fixed number of items)."""

    def __init__(self, records: list[Record], image_root: str | pathlib.Path, image_size: int):
        if not records:
            raise ValueError("no records to train on")
        self.records = records
        self.image_root = pathlib.Path(image_root)
        self.decode = LoadImage(image_size)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index % len(self.records)]
        item = {"path": str(self.image_root / record.image), "long_caption": record.long_caption}
        if record.short_caption:
            item["short_caption"] = record.short_caption
        return item


def file_source(reader, path: str, image_root: str, image_size: int, skip: int) -> CaptionFileSource:
    """A source over the records `reader` reads from `path`, less the first `skip`; images under `image_root`
    (default: the file's folder)."""
    if not path:
        raise ValueError("data.path must name the caption file")
    records = reader(path)[skip:]
    return CaptionFileSource(records, image_root or pathlib.Path(path).parent, image_size)

