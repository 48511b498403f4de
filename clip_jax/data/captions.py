"""Image-caption tables: one reader (`read_table`) for ShareGPT4V JSON, JSONL, CSV and TSV, used by the training
sources (`data.source = "sharegpt4v"` or `"captions"`, this file) and by `clip-jax data convert`.

- ShareGPT4V: a JSON list of {"image": relative path, "conversations": [{"from": "human", ...}, {"from": "gpt",
  "value": long caption}]} (Long-CLIP's training set); the caption is the first "gpt" turn.
- JSONL / CSV / TSV: one {"image": path, "caption": text[, "short_caption": text]} object per line, or a table
  whose header row names those columns (other names: `fields`); TSV is read without quoting. `caption` is the
  long caption; a missing short one is the long one's first sentence (Long-CLIP).
Other fields are kept as metadata. Image paths are relative to the image root (default: the file's folder), or
absolute, or remote (gs://).

Files are read as UTF-8 with undecodable bytes kept (surrogateescape), so a stray Latin-1 byte never stops the
reading; `caption_text` finds them. Training replaces them with U+FFFD and counts them (`data_bad_utf8`); the
converter skips such samples. A row without an image path (a JSONL line that is not JSON, an empty cell) comes back
with `problem="bad_row"`, a CSV row whose quote is never closed (it holds the rest of the file) with
`problem="unclosed_quote"`, a CSV/TSV row with more cells than the header (an unquoted comma in a caption) with
`problem="extra_cells"`: training drops them in the stream (counted in `data_dropped`), the converter counts them. A
header naming a column twice is refused (a ValueError), as it would lose one of the two cells of every row.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

from etils import epath

from clip_jax.files import file_stamp, is_remote

log = logging.getLogger(__name__)

TABLE_FORMATS = ("csv", "tsv", "jsonl", "sharegpt4v")
FIELDS = ("image", "caption", "short_caption")  # the default names of the image, caption and short caption fields
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv"}

# Cells up to 2 GiB, not the default 128 KiB: a long caption is a caption (2**31 - 1 fits a C long on every OS).
csv.field_size_limit(2**31 - 1)


@dataclasses.dataclass(frozen=True)
class Row:
    """One sample of a table or folder input, resolved to an image path."""

    key: str  # the image path as written in the input, or "<file> line <n>" (ShareGPT4V: "#<entry>") for a bad row
    image: str
    caption: Any = None  # as read: bad bytes as lone surrogates; None (or a non-string) when absent
    short_caption: Any = None
    metadata: dict | None = None
    caption_file: str | None = None  # folder inputs without captions.json: the caption is this file's text
    problem: str | None = None  # found while parsing the input (e.g. a bad JSON line): counted, not converted


def decode_text(data: bytes) -> str:
    """UTF-8 (a BOM dropped) with undecodable bytes kept as lone surrogates, for `caption_text` to find."""
    return data.decode("utf-8-sig", errors="surrogateescape")


def caption_text(raw: Any) -> tuple[str, bool]:
    """(the caption with whitespace runs, newlines too, collapsed to single spaces; whether it held bytes that are
    not UTF-8, now U+FFFD). `raw`: text as `read_table` returns it, bytes (a tar's .txt), or anything else, which is
    no caption: ("", False)."""
    if isinstance(raw, bytes):
        raw = decode_text(raw)
    if not isinstance(raw, str):
        return "", False
    replaced = False
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        try:
            data = raw.encode("utf-8", "surrogateescape")  # the file's bytes back
        except UnicodeEncodeError:  # a lone surrogate written as a JSON escape stands for no byte
            data = raw.encode("utf-8", "surrogatepass")
        raw, replaced = data.decode("utf-8", "replace"), True
    return " ".join(raw.split()), replaced


def negative_captions(raw: Any) -> tuple[tuple[str, ...], bool]:
    """(a row's negative captions, whether any held bytes that are not UTF-8, now U+FFFD): one caption, or several
    as a list: a JSON list (JSONL), or a Python or JSON list literal in a CSV/TSV cell, the form of NegCLIP's own COCO
    TSV (its `neg_caption` column). Each is cleaned as `caption_text` cleans a caption; empty ones are dropped."""
    bad = False
    if isinstance(raw, str | bytes):
        text, bad = caption_text(raw)
        parsed = None
        if text.startswith("[") and text.endswith("]"):
            try:
                parsed = ast.literal_eval(text)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                pass  # a caption that only looks like a list
        if not isinstance(parsed, list):
            return ((text,) if text else ()), bad
        raw = parsed
    negatives = []
    for item in raw if isinstance(raw, list | tuple) else [raw]:
        text, replaced = caption_text(item)
        bad |= replaced
        if text:
            negatives.append(text)
    return tuple(negatives), bad


def negative_caption_field(data: Any) -> str | None:
    """The column (records: the metadata key) holding each example's negative captions, None without
    `data.negative_captions`; `data` is the config's `data` group."""
    return data.negative_caption_field if data.negative_captions else None


def _resolve(image: str, root: str) -> str:
    return image if image.startswith("/") or is_remote(image) else os.fspath(epath.Path(root) / image)


def read_table(path: str, fmt: str, image_root: str | None = None, fields: Sequence[str] = FIELDS) -> list[Row]:
    """Rows of a csv/tsv/jsonl/sharegpt4v file, in file order. `fields`: the names of the image, caption and short
    caption. Raises only for a file that is not of its format as a whole (no header column for the image or
    caption, a ShareGPT4V file that is not a JSON list)."""
    if fmt not in TABLE_FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; choose one of {', '.join(TABLE_FORMATS)}")
    image_f, caption_f, short_f = fields
    root = image_root or os.fspath(epath.Path(path).parent)
    text = decode_text(epath.Path(path).read_bytes())
    if fmt == "sharegpt4v":
        entries = json.loads(text)
        if not isinstance(entries, list):
            raise ValueError(f"{path}: a ShareGPT4V file is a JSON list, not a {type(entries).__name__}")
        return [_sharegpt4v_row(i, entry, root) for i, entry in enumerate(entries)]
    objects = _jsonl_objects(text) if fmt == "jsonl" else _table_objects(text, fmt, path, (image_f, caption_f))
    rows = []
    for line, obj in objects:
        if obj is UNCLOSED_QUOTE or obj is EXTRA_CELLS:
            problem = "unclosed_quote" if obj is UNCLOSED_QUOTE else "extra_cells"
            rows.append(Row(key=f"{epath.Path(path).name} line {line}", image="", problem=problem))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get(image_f), str) or not obj[image_f]:
            rows.append(Row(key=f"{epath.Path(path).name} line {line}", image="", problem="bad_row"))
            continue
        meta = {k: v for k, v in obj.items() if k not in fields and v not in ("", None)}
        short = obj.get(short_f) or None
        rows.append(Row(obj[image_f], _resolve(obj[image_f], root), obj.get(caption_f), short, meta or None))
    return rows


# A CSV row whose quoted cell is never closed (`_table_objects`): it holds the rest of the file, so its rows too.
UNCLOSED_QUOTE = object()
# A CSV/TSV row with more cells than the header, some not empty: a caption with an unquoted comma, most often, which
# would be read cut at the comma (its rest dropped, or taken for the short caption).
EXTRA_CELLS = object()


class MissingColumns(ValueError):
    """A table without the image or caption column: its reader says which option names them."""


def text_lines(text: str) -> list[str]:
    """The lines of a text file's `text`, ended as the csv module ends them (\\n, \\r\\n, \\r), without their ends:
    str.splitlines also splits at U+2028, U+2029, U+0085 and the form feed and separators \\x0b-\\x1e, which a line
    of a caption, class name or JSON string may hold (row i of an output then stood for another line)."""
    return [line.rstrip("\r\n") for line in io.StringIO(text, newline="")]


def _jsonl_objects(text: str) -> list[tuple[int, Any]]:
    """(1-based line number, object or None where the line is not JSON) per non-blank line (`text_lines`: JSON
    allows U+2028 and U+0085 unescaped in a string)."""
    objects = []
    for n, line in enumerate(text_lines(text), 1):
        if line.strip():
            try:
                objects.append((n, json.loads(line)))
            except json.JSONDecodeError:
                objects.append((n, None))
    return objects


def _table_objects(text: str, fmt: str, path: str, required: Sequence[str]) -> list[tuple[int, dict]]:
    """(the line number its row starts on, {column: cell}) per row of a CSV/TSV text after its header row. Numbered
    by the file's lines (csv.reader's line_num), so blank lines, the header and quoted cells spanning lines count."""
    delimiter, quoting = ("\t", csv.QUOTE_NONE) if fmt == "tsv" else (",", csv.QUOTE_MINIMAL)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    header = next(reader, None)
    if header is None:
        raise ValueError(f"{path} is empty: a header row naming the columns comes first")
    missing = [f for f in required if f not in header]
    if missing:
        other, kind = ("\t", "TSV") if fmt == "csv" else (",", "CSV")
        if len(header) == 1 and other in header[0]:  # cells split by the other format's delimiter
            raise ValueError(f"{path}: its header {header} is one cell holding {other!r}: a {kind} file read as "
                             f"{fmt.upper()}? (training takes a table's format from its suffix, data convert from "
                             "--format)")
        raise MissingColumns(f"{path}: no column {', '.join(map(repr, missing))} in the header {header}")
    if twice := sorted({name for name in header if name and header.count(name) > 1}):  # (unnamed: no column)
        raise ValueError(f"{path}: the header names column {', '.join(map(repr, twice))} more than once; each "
                         "row's cell under one of them would be lost: rename the others")
    objects, end = [], reader.line_num
    for cells in reader:
        start, end = end + 1, reader.line_num  # a row starts on the line after the one the previous row ended on
        if any(cells[len(header) :]):  # (empty extra cells, a trailing delimiter: dropped)
            objects.append((start, EXTRA_CELLS))  # which of its cells is the caption's is anyone's guess
        elif cells:  # not a blank line; a missing cell is a missing key, as csv.DictReader's None
            objects.append((start, dict(zip(header, cells, strict=False))))
    if quoting != csv.QUOTE_NONE and objects and end > objects[-1][0] and _unclosed(text, objects[-1][0], end):
        objects[-1] = (objects[-1][0], UNCLOSED_QUOTE)
    return objects


def _unclosed(text: str, first: int, last: int) -> bool:
    """Whether the CSV row on lines first..last (1-based) ends inside a quoted cell: a quote opened and never closed,
    which the lenient reader runs on to the end of the file, taking in the rows after it. The strict reader says so
    (and nothing else with these words: a stray quote inside a cell is another error)."""
    lines = io.StringIO(text, newline="").readlines()[first - 1 : last]
    try:
        list(csv.reader(lines, strict=True))
    except csv.Error as e:
        return "unexpected end of data" in str(e)
    return False


def _sharegpt4v_row(i: int, entry: Any, root: str) -> Row:
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry["image"]:
        return Row(key=f"#{i}", image="", problem="bad_row")
    turns = [t.get("value") for t in entry.get("conversations", ()) if isinstance(t, dict) and t.get("from") == "gpt"]
    meta = {k: v for k, v in entry.items() if k not in ("image", "conversations")}
    return Row(entry["image"], _resolve(entry["image"], root), turns[0] if turns else None, None, meta or None)


def table_format(path: str) -> str:
    """The format of a `data.source = "captions"` file, by its suffix."""
    fmt = _SUFFIX_FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        folder = " is a folder" if epath.Path(path).is_dir() else ""
        raise ValueError(f"{path}{folder}: data.source 'captions' reads one table of image paths and captions "
                         f"({', '.join(_SUFFIX_FORMATS)}); a folder of images and captions trains as records: "
                         "`clip-jax data convert --format folder` (docs/data.md)")
    return fmt


class _Entry(NamedTuple):  # one row, as training reads it (a tuple: millions of them stay small)
    key: str
    path: str
    caption: str
    short_caption: str
    bad_utf8: bool
    problem: str | None
    negative: tuple[str, ...] = ()  # the captions that do not match the row (`negative_field`): one, or a list


class CaptionFileSource:
    """Random-access source (for `grain.MapDataset.source`) of table rows: items {"path", "long_caption"[,
    "short_caption"], "bad_utf8", "key"[, "error"]}, whose images the pipeline's decoding map reads
    (`pipeline.DecodeExample`, which also drops the items with an error or an empty caption). Captions are cleaned
    once, here; every row stays, so indices are rows of the file. Indices wrap around (the tokenizer corpus reads a
    fixed number of items)."""

    encoded_images = True  # items name image files for pipeline.DecodeExample

    def __init__(self, rows: Sequence[Row], name: str = "caption file", negative_field: str | None = None):
        if not rows:
            raise ValueError(f"{name}: no records to train on")
        if negative_field and not any((row.metadata or {}).get(negative_field) for row in rows):
            raise ValueError(f"{name}: no row has a {negative_field!r} column or key for its negative caption; name "
                             "it with data.negative_caption_field")
        self._entries = []
        for row in rows:
            caption, bad_long = caption_text(row.caption)
            short, bad_short = caption_text(row.short_caption)
            negative, bad_negative, problem = (), False, row.problem
            if not problem and row.caption is not None and not isinstance(row.caption, str | bytes):  # JSONL: 12, [..]
                kind = type(row.caption).__name__
                problem = f"its caption is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not text"
            if negative_field:
                # The negative stands against the row's caption: the short one, which has none, is not trained on.
                negative, bad_negative = negative_captions((row.metadata or {}).get(negative_field))
                short, problem = "", problem or (None if negative else f"no {negative_field}")
            self._entries.append(_Entry(row.key, row.image, caption, short, bad_long or bad_short or bad_negative,
                                        problem, negative))
        if negative_field and (shorts := sum(bool(row.short_caption) for row in rows)):
            log.warning("%s: %d rows have a short caption, which is not trained on with negative captions (a negative "
                        "stands against a row's caption)", name, shorts)
        bad_utf8 = sum(e.bad_utf8 for e in self._entries)
        unusable = sum(bool(e.problem or not e.caption) for e in self._entries)
        if bad_utf8:
            log.warning("%s: %d of %d rows have captions with bytes that are not UTF-8; they are replaced by U+FFFD "
                        "(training counts them in data_bad_utf8)%s", name, bad_utf8, len(rows),
                        "; so many that the file is likely in another encoding (GBK, Shift-JIS, Latin-1): save it as "
                        "UTF-8" if bad_utf8 > len(rows) // 2 else "")
        if unusable:
            log.warning("%s: %d of %d rows have no image path or no caption%s; training drops them (data_dropped)",
                        name, unusable, len(rows), f" or no {negative_field}" if negative_field else "")

    def __len__(self) -> int:
        return len(self._entries)

    def digest(self) -> str:
        """SHA-256 of the rows as training reads them (image as written, captions, negatives): what a checkpoint's
        data position indexes. A copy of the table, or one written again with the same rows, has the same digest."""
        digest = hashlib.sha256()
        for e in self._entries:
            digest.update(repr((e.key, e.caption, e.short_caption, e.negative)).encode("utf-8", "surrogatepass"))
        return digest.hexdigest()

    def __getitem__(self, index: int) -> dict:
        entry = self._entries[index % len(self._entries)]
        item = {"path": entry.path, "long_caption": entry.caption, "bad_utf8": int(entry.bad_utf8), "key": entry.key}
        if entry.short_caption:
            item["short_caption"] = entry.short_caption
        if entry.negative:
            item["long_caption_negative"] = entry.negative
        if entry.problem:
            item["error"] = entry.problem
        return item


def file_source(path: str, fmt: str | None, image_root: str, skip: int,
                fields: tuple[str, str] = FIELDS[:2], negative_field: str | None = None) -> CaptionFileSource:
    """A source over the rows of the table at `path` (format `fmt`, or by its suffix: `table_format`), less the
    first `skip`; images under `image_root` (default: the file's folder); `fields`: the image and caption columns.
    The table is read once per version of the file: the launch's check, the tokenizer corpus and the training
    stream share one read (10^6 rows took 17 s on the 2-core dev VM B, 2026-12-05)."""
    if not path:
        raise ValueError("data.path must name the caption file")
    try:
        stamp = tuple(file_stamp(path).items())
    except OSError:
        stamp = None  # read_table then says what is wrong with the path (a failure is not cached)
    return _cached_source(path, fmt, image_root, skip, tuple(fields), negative_field, stamp)


@functools.lru_cache(maxsize=1)  # the last table only: a run reads one
def _cached_source(path: str, fmt: str | None, image_root: str, skip: int, fields: tuple[str, str],
                   negative_field: str | None, stamp: tuple | None) -> CaptionFileSource:
    del stamp  # a key of the cache only: another version of the file is another entry
    rows = read_table(path, fmt or table_format(path), image_root or None, (*fields, FIELDS[2]))
    if rows and skip >= len(rows):
        raise ValueError(f"{path}: data.skip {skip} leaves out all of its {len(rows)} rows (the Long-CLIP recipes skip "
                         "ShareGPT4V's 1k test rows so); set --config.data.skip=0 to train on every row")
    return CaptionFileSource(rows[skip:], path, negative_field)
