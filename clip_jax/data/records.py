"""Our record format for web-scale image-text data (ArrayRecord shards of msgpack records) and the training source
that reads it (`data.source = "records"`).

A record is a msgpack map (layout in docs/data.md):
  "v": 1                 format version
  "image": bytes         the encoded image as published (JPEG/PNG/WebP); re-encoded by the converter only where a
                         reader could not use it as is (CMYK, 16-bit, other formats)
  "caption": str         the caption (the long one, when there are two); never truncated
  "short_caption": str   optional
  "metadata": str        optional JSON text (e.g. img2dataset's per-sample .json: url, original size, ...)
  "key": str             optional id of the sample in its source (tar key, file name, row)
Shards are named `<prefix>-00003-of-00016.arrayrecord` and written with `group_size:1` (every record its own
chunk, so a random read costs one record: grain's global shuffle reads in random order) and no compression
(images are compressed already; brotli would cost CPU on every read for ~nothing).

Training: grain reads records by global index (this host's slice, global shuffle, checkpointable iterator
state), and the pipeline's decoding map (`pipeline.DecodeExample`) decodes the bytes to RGB uint8 ahead of the
random resized crop; a record whose image cannot be decoded is dropped and counted there (docs/data.md, "Bad
samples at training time").

Paths go through `etils.epath`, and ArrayRecord's reader opens `gs://` paths itself; its writer writes local
files only, so `ShardWriter` writes remote shards locally first and copies them (epath needs gcsfs for gs://).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import msgpack
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath

from clip_jax.data.captions import negative_caption_field, negative_captions
from clip_jax.data.images import decode_image
from clip_jax.errors import shortened
from clip_jax.files import is_remote

FORMAT_VERSION = 1
SUFFIX = ".arrayrecord"
WRITER_OPTIONS = "group_size:1,uncompressed"
SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5,})-of-(?P<count>\d{5,})\.arrayrecord$")
_GLOB_CHARS = re.compile(r"[*?\[]")


def shard_name(prefix: str, index: int, count: int) -> str:
    return f"{prefix}-{index:05d}-of-{count:05d}{SUFFIX}"


# --- Records --------------------------------------------------------------------------------------------------


def encode_record(image: bytes, caption: str, *, short_caption: str | None = None,
                  metadata: dict | str | None = None, key: str | None = None) -> bytes:
    """One record's bytes. `metadata` is stored as JSON text (a dict is serialised, a str kept as given)."""
    record: dict[str, Any] = {"v": FORMAT_VERSION, "image": bytes(image), "caption": caption}
    if short_caption:
        record["short_caption"] = short_caption
    if metadata is not None:
        text = metadata if isinstance(metadata, str) else json.dumps(metadata, ensure_ascii=False,
                                                                     separators=(",", ":"))
        if not text.isascii() and not _encodable(text):
            # Bytes that are not UTF-8 in a table's other columns (kept as lone surrogates) or a lone surrogate a
            # JSON file escapes: JSON's escapes keep them as they were, where msgpack cannot pack them at all.
            text = json.dumps(json.loads(text), separators=(",", ":"))
        record["metadata"] = text
    if key is not None:
        record["key"] = key
    return msgpack.packb(record, use_bin_type=True)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def decode_record(data: bytes) -> dict[str, Any]:
    """The record's fields (see the module docstring); ValueError if `data` is not a record of ours."""
    try:
        record = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise ValueError(f"not a clip_jax record: {e}") from None
    if not isinstance(record, dict) or record.get("v") != FORMAT_VERSION or not isinstance(record.get("image"), bytes):
        raise ValueError(f"not a clip_jax record (version {FORMAT_VERSION}): keys {sorted(record)[:8]}"
                         if isinstance(record, dict) else "not a clip_jax record: not a map")
    return record


def record_metadata(record: dict[str, Any]) -> dict | None:
    text = record.get("metadata")
    return json.loads(text) if text else None


# --- Shards ---------------------------------------------------------------------------------------------------


def glob(pattern: str) -> list[str]:
    """Sorted paths matching `pattern` (local or remote): epath globs below the last folder without wildcards."""
    pieces = pattern.split("/")
    first = next((i for i, piece in enumerate(pieces) if _GLOB_CHARS.search(piece)), len(pieces))
    base = "/".join(pieces[:first]) or ("/" if pattern.startswith("/") else ".")
    return sorted(os.fspath(p) for p in epath.Path(base).glob("/".join(pieces[first:])))


def list_shards(spec: str) -> list[str]:
    """Shard paths of `spec`: a directory (all its shards, which must be complete: every index of `-of-N`), a
    glob, a file, or a comma-separated list of these. Sorted within each item."""
    found: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if _GLOB_CHARS.search(part):
            matched = [p for p in glob(part) if p.endswith(SUFFIX)]
            if not matched:
                raise FileNotFoundError(f"no {SUFFIX} shards match {part}")
        else:
            path = epath.Path(part)
            if path.is_dir():
                names = [p.name for p in path.iterdir()]
                matched = sorted(os.fspath(path / n) for n in names if n.endswith(SUFFIX))
                if not matched:
                    unfinished = sum(f"{SUFFIX}.tmp-" in n for n in names)
                    tars = sum(n.endswith(".tar") for n in names)
                    raise FileNotFoundError(f"no {SUFFIX} shards in {part}" + (
                        f": {unfinished} unfinished (.tmp-): is a `clip-jax data convert` into it still running? Run "
                        "it (again) to finish them" if unfinished else
                        f": it holds {tars} .tar files (WebDataset shards?): convert them first, clip-jax data "
                        f"convert --format webdataset {part} --out RECORDS" if tars else ""))
                _check_complete(matched, part)
            elif path.exists():
                matched = [os.fspath(path)]
            else:
                raise FileNotFoundError(f"shard path {part} does not exist")
        found.extend(matched)
    if not found:
        raise FileNotFoundError(f"data.path {spec!r} names no shards")
    return found


def _check_complete(paths: list[str], where: str) -> None:
    """A directory stands for a whole data set: missing shards mean a conversion that has not finished."""
    sets: dict[tuple[str, int], set[int]] = {}
    for p in paths:
        m = SHARD_RE.match(epath.Path(p).name)
        if m:
            sets.setdefault((m["prefix"], int(m["count"])), set()).add(int(m["index"]))
    if len(sets) > 1:  # a `data convert --prefix` beside another set, or another conversion's shards copied in
        kinds = ", ".join(f"{len(have)} '{prefix}' shards of {count}" for (prefix, count), have in sorted(sets.items()))
        first = sorted(sets)[0][0]
        raise FileNotFoundError(f"{where} holds more than one set of shards ({kinds}), and a folder stands for one: "
                                f"name a set with a glob, e.g. {where.rstrip('/')}/{first}-*{SUFFIX}")
    for (prefix, count), have in sorted(sets.items()):
        missing = sorted(set(range(count)) - have)
        if missing:
            names = ", ".join(f"{i:05d}" for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise FileNotFoundError(
                f"{where}: {len(have)} of {count} '{prefix}' shards present (missing {names}); is the conversion "
                "still running? To train on a subset, name the shards with a glob"
            )


def open_shards(paths: Sequence[str]) -> grain.sources.ArrayRecordDataSource:
    """grain's random-access source over the shards `paths`. Raises ValueError naming the first file that is not
    an ArrayRecord file (a file named by mistake, a shard cut short): ArrayRecord's own error does not say which."""
    try:
        return grain.sources.ArrayRecordDataSource(list(paths))
    except RuntimeError:
        for path in paths:
            try:
                grain.sources.ArrayRecordDataSource([path])
            except RuntimeError as e:
                raise ValueError(f"{path} is not an ArrayRecord shard ({e}); `clip-jax data convert` writes them "
                                 "(a caption table trains as data.source=captions)") from None
        raise


class ShardWriter:
    """Writes one shard under a temporary name and renames it on a clean close, so an existing shard is always
    complete. A remote destination is written locally, then copied (ArrayRecord writes local files only)."""

    def __init__(self, path: str | os.PathLike):
        self.path = epath.Path(path)
        self.count = 0
        self._tmp_name = f"{self.path.name}.tmp-{socket.gethostname()}-{os.getpid()}"
        self._local_dir = tempfile.mkdtemp(prefix="clip_jax_shard_") if is_remote(path) else None
        self._tmp = (epath.Path(self._local_dir) if self._local_dir else self.path.parent) / self._tmp_name
        self._writer = ArrayRecordWriter(os.fspath(self._tmp), WRITER_OPTIONS)

    def write(self, record: bytes) -> None:
        self._writer.write(record)
        self.count += 1

    def close(self) -> None:
        self._writer.close()
        if self._local_dir is None:
            self._tmp.replace(self.path)
            return
        remote_tmp = self.path.parent / self._tmp_name
        self._tmp.copy(remote_tmp, overwrite=True)
        remote_tmp.replace(self.path)
        shutil.rmtree(self._local_dir, ignore_errors=True)

    def abort(self) -> None:
        try:
            with contextlib.suppress(Exception):  # (closed already, or failing: the error that aborts it is told)
                self._writer.close()
        finally:  # no temporary file left, whatever happened
            self._tmp.unlink(missing_ok=True)
            if self._local_dir:
                shutil.rmtree(self._local_dir, ignore_errors=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:  # a write error, or a stop that lands while it closes: no temporary file left
            self.abort()
            raise


# --- Training source ------------------------------------------------------------------------------------------


NEGATIVE_PROBE = 100  # records read at launch to find the negative captions (data.negative_caption_field)


class RecordSource:
    """Random-access source (for `grain.MapDataset.source`) over shards: items {"image_bytes", "long_caption"
    [, "short_caption"], "key"}, decoded in the pipeline's grain map. A record that does not parse comes back
    without image bytes and with an `error`, so the map drops and counts it like an undecodable image.

    `negative_field` (data.negative_caption_field, method negclip): each item also carries the negatives of its
    caption, `long_caption_negative` (one, or a list to draw from), read from that key of the record's metadata
    (where `clip-jax data convert` keeps a table's other columns and a tar's .json); a record without one comes back
    with an `error` (dropped and counted), and its short caption is not read (the negative stands against the
    caption). `probe_negatives` is the launch check that the first records have them."""

    encoded_images = True  # items hold encoded bytes for pipeline.DecodeExample

    def __init__(self, paths: Sequence[str], negative_field: str | None = None):
        self.paths = list(paths)
        self.negative_field = negative_field
        self._source = open_shards(self.paths)
        if len(self._source) == 0:
            raise ValueError(f"the shards {self.paths[:3]}{' ...' if len(self.paths) > 3 else ''} hold no records: "
                             "their conversion skipped every sample (its reports/ say why); convert again")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        # Indices wrap around, as in captions.CaptionFileSource: pipeline.tokenizer_corpus reads a fixed count.
        try:
            record = decode_record(self._source[index % len(self._source)])
        except ValueError as e:
            return {"image_bytes": None, "long_caption": "", "key": f"#{index}", "error": str(e)}
        item = {"image_bytes": record["image"], "long_caption": record["caption"], "key": record.get("key", "")}
        if self.negative_field:
            negative, bad_utf8 = self._negative(record)
            if not negative:
                return item | {"image_bytes": None, "error": f"no {self.negative_field} in its metadata"}
            item |= {"long_caption_negative": negative, "bad_utf8": int(bad_utf8)}
        elif record.get("short_caption"):
            item["short_caption"] = record["short_caption"]
        return item

    def _negative(self, record: dict[str, Any]) -> tuple[tuple[str, ...], bool]:
        """(the record's negative captions, one or a list, none if it has none; whether they held bytes that are
        not UTF-8, now U+FFFD), as `captions.negative_captions` reads a caption file's."""
        try:
            metadata = record_metadata(record)
        except ValueError:  # metadata that is not JSON has no negative
            return (), False
        return negative_captions(metadata.get(self.negative_field)) if isinstance(metadata, dict) else ((), False)

    def probe_negatives(self) -> tuple[int, int]:
        """The launch check of `negative_field`: reads the first NEGATIVE_PROBE records; ValueError if none has a
        negative, else (the records read, how many of them have a short caption, which training does not read)."""
        probed = []
        for index in range(min(len(self), NEGATIVE_PROBE)):
            try:
                probed.append(decode_record(self._source[index]))
            except ValueError:
                continue
        if not any(self._negative(record)[0] for record in probed):
            raise ValueError(f"none of the first {min(len(self), NEGATIVE_PROBE)} records has {self.negative_field!r} "
                             "in its metadata for its negative caption (`clip-jax data convert` keeps a table's other "
                             "columns there); name the key with data.negative_caption_field")
        return len(probed), sum(bool(record.get("short_caption")) for record in probed)


def records_source(config: ml_collections.ConfigDict, split: str) -> RecordSource:
    """`data.source = "records"`: the shards of `data.path`, less nothing (`data.skip` is for caption files)."""
    if split != "train":
        raise ValueError(f"data.source 'records' has only a train split, not {split!r}")
    if not config.data.path:
        raise ValueError("data.source 'records' needs data.path: a shard directory, a glob or a list of shards")
    return RecordSource(list_shards(config.data.path), negative_caption_field(config.data))


SHOWN_CAPTION_CHARS = 500  # what `data inspect` prints of a caption: a web caption can run to megabytes


def _shown(caption: str | None) -> str | None:
    return None if caption is None else shortened(caption, SHOWN_CAPTION_CHARS)


def describe(spec: str, n: int = 3) -> dict[str, Any]:
    """Shard count, record count and the first `n` records (key, captions cut to SHOWN_CAPTION_CHARS, image size)
    of `spec`."""
    paths = list_shards(spec)
    source = open_shards(paths)
    samples = []
    for i in range(min(n, len(source))):
        record = decode_record(source[i])
        try:
            h, w = decode_image(record["image"])[0].shape[:2]
            size = f"{w}x{h}"
        except Exception as e:  # noqa: BLE001 - reported, not raised: this is an inspection tool
            size = f"undecodable ({type(e).__name__})"
        samples.append({"key": record.get("key"), "caption": _shown(record["caption"]),
                        "short_caption": _shown(record.get("short_caption")), "image": size,
                        "metadata": record_metadata(record)})
    out = {"shards": len(paths), "records": len(source), "first": paths[0], "samples": samples}
    if (converted := _conversion_summary(paths[0])) is not None:
        out["converted"] = converted
    return out


def _conversion_summary(first_shard: str) -> dict[str, Any] | None:
    """What `clip-jax data convert` read into the shards beside `first_shard` (its reports/<prefix>-summary.json:
    shards done of all, missing and failed ones, samples read, written, skipped by reason), with the file to read for
    examples; None without a readable one."""
    shard = epath.Path(first_shard)
    if not (match := SHARD_RE.match(shard.name)):
        return None
    path = shard.parent / "reports" / f"{match['prefix']}-summary.json"
    try:
        summary = json.loads(path.read_text())
        return {key: summary[key] for key in ("shards", "shards_done", "missing", "failed", "samples", "written",
                                               "skipped")} | {"report": str(path)}
    except (OSError, ValueError, KeyError, TypeError):
        return None
