"""`clip-jax data convert`: image-caption data in common layouts -> our ArrayRecord shards (records.py).

Formats (layouts and examples in docs/data.md): `webdataset` (img2dataset tars: `<key>.jpg|png|webp` + `.txt` +
`.json`; one tar -> one shard), `csv`/`tsv`/`jsonl` (image path, caption[, short_caption]; other fields become
metadata), `sharegpt4v` (JSON list; the caption is the first "gpt" turn) and `folder` (images with `captions.json`
or a `.txt` beside each). Tables and folders are cut into chunks of `shard_size` samples, one shard each.

Shards are numbered over all inputs in order, so machines can convert disjoint slices (`shard_index` of
`num_shards`) of the same command into one directory, or an Apache Beam runner can spread them over its workers
(beam_convert.py). A shard is written under a temporary name and renamed when complete, then its JSON report goes
to `reports/`, with a fingerprint of its input (`fingerprint`): a re-run skips shards whose report exists with the
same fingerprint and redoes the others. Bad samples (undecodable or truncated images, missing files, paths that are
not regular files or exceed `max_image_bytes`, missing/empty/non-UTF-8 captions, images below `min_size`) are
skipped and counted by reason, never fatal. Captions are kept whole (whitespace collapsed): truncation to a context
length happens at tokenization.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import hashlib
import io
import json
import multiprocessing
import os
import posixpath
import re
import signal
import socket
import sys
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from etils import epath
from PIL import Image

from clip_jax.data import records
from clip_jax.data.captions import FIELDS, TABLE_FORMATS, Row, caption_text, decode_text, read_table
from clip_jax.data.images import (
    DEFAULT_MAX_IMAGE_BYTES,
    IMAGE_SUFFIXES,
    RefusedFile,
    bad_image_reason,
    decode_error_text,
    read_image_file,
    to_rgb,
)
from clip_jax.errors import sigterm_raises
from clip_jax.files import absolute_path, canonical_path, file_stamp, visible_files

FORMATS = ("webdataset", *TABLE_FORMATS, "folder")
KEEP_FORMATS = ("JPEG", "PNG", "WEBP")
# 8-bit modes that every reader turns into RGB the same way; others (CMYK, 16-bit, float, LAB) are re-encoded.
KEEP_MODES = ("RGB", "L", "RGBA", "LA", "P", "PA", "1")
# the image member of a sample: WebDataset's usual ones first, then the other kinds a folder input reads
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", *(s.removeprefix(".") for s in IMAGE_SUFFIXES))
EXAMPLES_PER_REASON = 5
# a table's image, caption and short caption fields: no short caption field named (None) reads FIELDS' where there is
# one, and no input need have it (`plan`)
TABLE_FIELDS = (FIELDS[0], FIELDS[1], None)


class Skip(Exception):  # noqa: N818 - a control-flow signal carrying the skip reason, not an error
    """A sample is skipped for `reason` (a report key)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class Task:
    """One output shard: a whole tar (rows None) or a chunk of rows."""

    index: int
    source: str
    rows: list[Row] | None = None
    fingerprint: dict | None = None  # of `source`, taken before its rows were read; a tar's is taken when converted


@dataclasses.dataclass(frozen=True)
class Options:
    out: str
    prefix: str
    count: int  # shards in the whole data set (the N of -of-N)
    min_size: int
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # files read for a row (images, caption sidecars): at most this


# --- Images and captions --------------------------------------------------------------------------------------


def prepare_image(data: bytes, min_size: int) -> tuple[bytes, str | None]:
    """(bytes to store, None) when the original can be kept, else (re-encoded bytes, "FORMAT/MODE" of the original):
    CMYK JPEGs become RGB JPEGs (quality 95), other formats and modes RGB PNGs. Raises Skip for a bad image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode, (w, h) = img.format, img.mode, img.size
            if min(w, h) < min_size:
                raise Skip("too_small", f"{w}x{h}")
            img.load()  # decode everything: a truncated file fails here, not in training
            if fmt in KEEP_FORMATS and mode in KEEP_MODES:
                return data, None
            rgb = to_rgb(img)
    except Skip:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt data; a bad sample is never fatal
        raise Skip(bad_image_reason(e), decode_error_text(e)) from None
    out = io.BytesIO()
    if fmt == "JPEG":  # a lossy original stays lossy; PNG of a photo would be 5-10x larger
        Image.fromarray(rgb).save(out, "JPEG", quality=95, subsampling=0)
    else:
        Image.fromarray(rgb).save(out, "PNG")
    return out.getvalue(), f"{fmt}/{mode}"


def clean_caption(raw: Any) -> str:
    """The caption with whitespace runs (newlines too) collapsed to single spaces (`captions.caption_text`); Skip
    if absent, empty or not valid UTF-8 (tables are read with surrogateescape, so bad bytes arrive here as lone
    surrogates)."""
    if not isinstance(raw, str | bytes):
        raise Skip("missing_caption", "" if raw is None else f"caption is {type(raw).__name__}")
    text, replaced = caption_text(raw)
    if replaced:
        raise Skip("non_utf8_caption", text[:80])
    if not text:
        raise Skip("empty_caption")
    return text


# --- Reading inputs -------------------------------------------------------------------------------------------


def _read_by_folder(folder: epath.Path, path: epath.Path) -> bool:
    """Whether `read_folder` reads `path`: an image, a caption sidecar or the top captions.json (not, say, the shards
    and reports of an --out inside the folder)."""
    return path.suffix.lower() in (*IMAGE_SUFFIXES, ".txt") or path == folder / "captions.json"


def read_folder(path: str) -> list[Row]:
    """Rows of a folder input: its images, sorted, with captions from captions.json or sidecar .txt files."""
    folder = epath.Path(path)
    images = sorted(p for p in visible_files(folder) if p.suffix.lower() in IMAGE_SUFFIXES)
    index = folder / "captions.json"
    captions = json.loads(decode_text(index.read_bytes())) if index.exists() else None
    rows = []
    for p in images:
        rel = p.relative_to(folder).as_posix()
        if captions is None:
            rows.append(Row(rel, os.fspath(p), caption_file=os.fspath(p.with_suffix(".txt"))))
            continue
        entry = captions.get(rel)
        if isinstance(entry, dict):
            rows.append(Row(rel, os.fspath(p), entry.get("caption"), entry.get("short_caption") or None))
        else:
            rows.append(Row(rel, os.fspath(p), entry))  # None: counted as missing_caption
    if captions is not None:  # captions of no image found (a misspelt or miscased name): counted as missing_file
        found = {row.key for row in rows}
        rows += [Row(key, "", problem="missing_file") for key in sorted(captions) if key not in found]
    return rows


class _EndMarkedTarInfo(tarfile.TarInfo):
    """Tells a tar that ends where its end-of-archive blocks should be from one that has them: tarfile reads a file
    cut between two members (at a header, or inside one) as ended, with no error. It marks the TarFile `cut_short`."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):  # no bytes, or part of a header block
            tar.cut_short = True
            raise


def _tar_samples(path: str, stats: ShardStats) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a WebDataset tar, streamed in order. The key is the member's path
    up to the first dot of its base name (WebDataset's rule); a key's files repeated right after them are another
    sample of that key. A tar cut short (an interrupted download), inside a
    member or between two, ends the shard early: the sample being read is counted as `truncated_tar` (cut between
    its files, it may lack some), the samples before it are kept."""
    key, files = None, {}
    with epath.Path(path).open("rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r|*", tarinfo=_EndMarkedTarInfo) as tar:
                for member in tar:
                    base = posixpath.basename(member.name)
                    if not member.isfile() or base.startswith(".") or "." not in base:
                        continue
                    stem, ext = base.split(".", 1)
                    member_key = posixpath.join(posixpath.dirname(member.name), stem)
                    # a file of a kind the sample has already (a.jpg a.txt a.jpg a.txt: a key written twice) starts
                    # the next sample: each pair is kept, where the second replaced the first
                    if member_key != key or ext.lower() in files:
                        if key is not None:
                            yield key, files
                        key, files = member_key, {}
                    files[ext.lower()] = tar.extractfile(member).read()
                if getattr(tar, "cut_short", False):
                    raise tarfile.ReadError("the tar ends without its end-of-archive blocks")
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            if isinstance(e, OSError) and e.errno is not None:
                # The storage failed (EIO, a connection reset), not the tar's bytes: the shard fails, without a
                # report, so a re-run converts it again. Counted as a cut tar, it would be marked complete.
                raise OSError(f"cannot read {path}: {e.strerror or e}; the shard is left unfinished, re-run the "
                              "command to convert it") from None
            stats.samples += 1  # the partial sample: samples == written + skipped holds
            # Before any file of it was read: not a tar at all (a table given as --format webdataset, say), or one
            # cut before its first file.
            reason = "truncated_tar" if key is not None else "unreadable_tar"
            stats.skip(reason, key or path, f"{type(e).__name__}: {e}")
            return
    if key is not None:
        yield key, files


# --- Converting one shard -------------------------------------------------------------------------------------


@dataclasses.dataclass
class ShardStats:
    samples: int = 0
    skipped: Counter[str] = dataclasses.field(default_factory=Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # the first few keys per reason
    reencoded: Counter[str] = dataclasses.field(default_factory=Counter)
    metadata_dropped: int = 0  # samples kept without their unparseable .json

    def skip(self, reason: str, key: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        if len(examples := self.examples.setdefault(reason, [])) < EXAMPLES_PER_REASON:
            examples.append(f"{key}: {detail}" if detail and detail != key else key)


def _record(key: str, image: bytes, caption: Any, short: Any, metadata: Any, opts: Options,
            stats: ShardStats) -> bytes:
    data, original = prepare_image(image, opts.min_size)
    if original:
        stats.reencoded[original] += 1
    short_text = clean_caption(short) if short else None
    return records.encode_record(data, clean_caption(caption), short_caption=short_text, metadata=metadata, key=key)


def _tar_record(sample: tuple[str, dict[str, bytes]], opts: Options, stats: ShardStats) -> bytes:
    key, files = sample
    image = next((files[e] for e in WDS_IMAGE_EXTS if e in files), None)
    if image is None:
        raise Skip("missing_image", f"members {sorted(files)}")
    metadata = None
    if "json" in files:
        try:
            # bytes that are not UTF-8 kept as lone surrogates, as a table's are: its other keys stay, and a caption
            # there is counted as non_utf8_caption
            metadata = json.loads(decode_text(files["json"]))
        except ValueError:
            stats.metadata_dropped += 1  # metadata is optional: drop it, keep the sample
    caption = files.get("txt")
    if caption is None and isinstance(metadata, dict):
        caption = metadata.get("caption")
    return _record(key, image, caption, None, metadata, opts, stats)


def _read_file(path: str, missing_reason: str, opts: Options) -> bytes:
    """A row's file (its image, or its caption sidecar), regular files of at most `max_image_bytes` only (a FIFO
    or a device would hang or never end); Skip otherwise."""
    try:
        return read_image_file(path, opts.max_image_bytes)
    except RefusedFile as e:
        raise Skip(e.reason, str(e)) from None
    except FileNotFoundError:
        raise Skip(missing_reason, path) from None
    except OSError as e:  # no permission, an I/O error: this file, not the conversion
        raise Skip("unreadable_file", f"{path}: {e}") from None


def _row_record(row: Row, opts: Options, stats: ShardStats) -> bytes:
    if row.problem:
        raise Skip(row.problem)
    caption = row.caption
    if row.caption_file is not None:
        caption = _read_file(row.caption_file, "missing_caption", opts)
    image = _read_file(row.image, "missing_file", opts)
    return _record(row.key, image, caption, row.short_caption, row.metadata, opts, stats)


def report_path(opts: Options, index: int) -> epath.Path:
    stem = records.shard_name(opts.prefix, index, opts.count).removesuffix(records.SUFFIX)
    return epath.Path(opts.out) / "reports" / f"{stem}.json"


def fingerprint(path: str, fmt: str) -> dict[str, Any]:
    """What a shard was made from, kept in its report so that a re-run redoes a shard whose input changed: a file's
    size and modification time (remote: as the store reports them); for a folder input, the number of files it
    reads below it (images, captions.json, .txt sidecars) and a hash of each one's relative path, size and time (an
    image added, removed or replaced changes it; other files, such as an --out inside it, do not). Take it before
    reading the input: a change made meanwhile then shows next time."""
    if fmt != "folder":
        return file_stamp(path)
    folder = epath.Path(path)
    digest, count = hashlib.sha256(), 0
    for p in sorted(p for p in visible_files(folder) if _read_by_folder(folder, p)):
        digest.update(json.dumps([p.relative_to(folder).as_posix(), file_stamp(p)]).encode() + b"\n")
        count += 1
    return {"files": count, "sha256": digest.hexdigest()}


def recipe(task: Task, opts: Options) -> dict[str, Any]:
    """What else a shard is made from, kept in its report beside the input's fingerprint: the image checks' options
    and, for a table or folder, a hash of its rows (their image paths, so --image-root, and the columns read)."""
    out: dict[str, Any] = {"min_size": opts.min_size, "max_image_bytes": opts.max_image_bytes}
    if task.rows is not None:
        digest = hashlib.sha256()
        for row in task.rows:  # paths absolute: a re-run from another folder makes the same rows
            row = dataclasses.replace(row, image=absolute_path(row.image),
                                      caption_file=row.caption_file and absolute_path(row.caption_file))
            digest.update(json.dumps(dataclasses.astuple(row), default=str).encode() + b"\n")
        out["rows_sha256"] = digest.hexdigest()
    return out


def convert_shard(task: Task, opts: Options) -> dict[str, Any]:
    """Writes shard `task.index` and its report; returns the report: the existing one (with `resumed`) if the shard
    was made from the same input, else the new one (with `redone`, why, when it replaced an older shard)."""
    name = records.shard_name(opts.prefix, task.index, opts.count)
    report_file = report_path(opts, task.index)
    # a tar's stamp is taken here: in parallel, for this machine's shards only (one request each on a bucket)
    stamp = task.fingerprint or fingerprint(task.source, "webdataset")
    made_with = recipe(task, opts)
    redone = None
    # The report is written last: its presence means the shard was complete (and is, unless deleted since).
    if report_file.exists() and not (epath.Path(opts.out) / name).exists():
        redone = "its shard file is gone (its report remains)"
    elif report_file.exists():
        old = json.loads(report_file.read_text())
        # A report of a version before recipes were kept resumes on the input's fingerprint alone, as it did then.
        if old.get("input_fingerprint") == stamp and old.get("recipe", made_with) == made_with:
            return old | {"resumed": True}
        redone = ("its report (from an older version) records no input fingerprint" if "input_fingerprint" not in old
                  else "its input changed since it was converted" if old["input_fingerprint"] != stamp
                  else "other options make it (--image-root, the columns, --min-size or --max-image-bytes)")
    start = time.time()
    stats = ShardStats()
    samples, make = (_tar_samples(task.source, stats), _tar_record) if task.rows is None else (task.rows, _row_record)
    with records.ShardWriter(epath.Path(opts.out) / name) as writer:
        for sample in samples:
            if _stop_code is not None:  # a stop whose exception was swallowed (raised inside a gc callback)
                raise SystemExit(_stop_code)
            stats.samples += 1
            try:
                writer.write(make(sample, opts, stats))
            except Skip as s:
                stats.skip(s.reason, sample.key if isinstance(sample, Row) else sample[0], s.detail)
    report = {
        "shard": name, "input": absolute_path(task.source), "samples": stats.samples, "written": writer.count,
        "skipped": dict(sorted(stats.skipped.items())), "examples": stats.examples,
        "reencoded": dict(sorted(stats.reencoded.items())), "metadata_dropped": stats.metadata_dropped,
        "bytes": (epath.Path(opts.out) / name).stat().length, "seconds": round(time.time() - start, 2),
        "host": socket.gethostname(), "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "input_fingerprint": stamp, "recipe": made_with,
    }
    _write_json(report_file, report)
    return report | ({"redone": redone} if redone else {})


def _write_json(path: epath.Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)


# --- The command ----------------------------------------------------------------------------------------------


def expand_inputs(inputs: Sequence[str], fmt: str) -> list[str]:
    """Input paths in the order given; globs and, for tars, directories (their *.tar, sorted) expanded."""
    out: list[str] = []
    for spec in inputs:
        path = epath.Path(spec)
        if any(c in spec for c in "*?["):
            matched = records.glob(spec)
            if not matched:
                raise FileNotFoundError(f"no input matches {spec}")
            out.extend(matched)
        elif fmt == "webdataset" and path.is_dir():
            tars = sorted(os.fspath(p) for p in path.glob("*.tar"))
            if not tars:
                raise FileNotFoundError(f"input {spec} is a folder without .tar files: --format webdataset reads tars "
                                        "(a folder of images and captions is --format folder)")
            out.extend(tars)
        elif not path.exists():
            raise FileNotFoundError(f"input {spec} does not exist: check the path (INPUT is a file, a folder or a "
                                    "quoted glob)")
        elif fmt == "folder" and not path.is_dir():
            raise ValueError(f"input {spec} is not a folder: --format folder reads folders of images (a caption "
                             "table is --format csv, tsv, jsonl or sharegpt4v)")
        elif fmt != "folder" and path.is_dir():
            raise ValueError(f"input {spec} is a folder: --format {fmt} reads files (a folder of images is "
                             "--format folder)")
        else:
            out.append(spec)
    if not out:
        raise FileNotFoundError(f"no inputs in {list(inputs)}")
    seen: dict[str, str] = {}
    for path in out:  # a folder and a file of it, or a path and a glob: its samples would be written twice
        if (first := seen.get(canonical_path(path))) is not None:
            raise ValueError(f"input {path} is named twice ({first} is the same file or folder): each input is "
                             "converted once; name it once")
        seen[canonical_path(path)] = path
    return out


def plan(fmt: str, inputs: Sequence[str], image_root: str | None = None, shard_size: int = 10_000,
         fields: Sequence[str | None] = TABLE_FIELDS) -> list[Task]:
    """Every output shard of the data set, numbered over the inputs in order (the same on every machine). `fields`:
    the image, caption and short caption fields of a table; a short caption field of None is FIELDS' default, which
    an input may lack, where one that is named must be in some row of each input (a misspelt name was ignored)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    short_named = fields[2]
    if short_named is not None and fmt not in ("csv", "tsv", "jsonl"):
        raise ValueError(f"--short-caption-field is for csv, tsv and jsonl tables; --format {fmt} has no short caption")
    fields = (fields[0], fields[1], short_named or FIELDS[2])
    paths = expand_inputs(inputs, fmt)
    if fmt == "webdataset":
        return [Task(i, p) for i, p in enumerate(paths)]
    tasks: list[Task] = []
    for p in paths:
        stamp = fingerprint(p, fmt)  # before reading: a change made meanwhile shows in the next run
        rows = read_folder(p) if fmt == "folder" else read_table(p, fmt, image_root, fields)
        if short_named is not None and rows and not any(row.short_caption for row in rows):
            raise ValueError(f"{p}: no row has a short caption under {short_named!r} (--short-caption-field): check "
                             "the name, or leave the option out")
        for start in range(0, len(rows), shard_size):
            tasks.append(Task(len(tasks), p, rows[start : start + shard_size], stamp))
    return tasks


def _shard_index(name: str) -> int:
    return int(records.SHARD_RE.match(name)["index"])


def read_reports(out: str, prefix: str, count: int) -> list[dict[str, Any]]:
    """The reports present in `out` of the data set's `count` shards whose shard is there too, in shard order (a
    shard deleted by hand is not done, whatever its report says)."""
    opts = Options(out, prefix, count, 0)
    reports = []
    for i in range(count):
        report = report_path(opts, i)
        if report.exists() and (epath.Path(out) / records.shard_name(prefix, i, count)).exists():
            reports.append(json.loads(report.read_text()))
    return reports


def failure(task: Task, opts: Options, error: BaseException) -> dict[str, str]:
    """The summary's `failed` entry of a shard that failed as a whole."""
    return {"shard": records.shard_name(opts.prefix, task.index, opts.count), "input": task.source,
            "error": failure_text(error)}


def is_stale(report: dict[str, Any], task: Task, opts: Options) -> bool:
    """Whether a shard was made from another version of its input, or with other options, than this command makes
    it from: another machine's slice converted before the input changed. Known for tables and folders, whose
    fingerprint the plan takes; a tar's is taken only where it is converted."""
    if task.fingerprint is None:
        return False
    made_with = recipe(task, opts)
    return report.get("input_fingerprint") != task.fingerprint or report.get("recipe", made_with) != made_with


def summarize(out: str, prefix: str, count: int, failed: Sequence[dict] = (),
              tasks: Sequence[Task] | None = None, opts: Options | None = None) -> dict[str, Any]:
    """Totals over all shard reports in `out` (from every machine), written to reports/<prefix>-summary.json. With
    the command's `tasks` and `opts`, a shard made from another version of its input (`is_stale`) is not done: it is
    listed under `stale`, and its slice must be converted again."""
    reports = read_reports(out, prefix, count)
    stale = [r["shard"] for r in reports
             if tasks is not None and opts is not None and is_stale(r, tasks[_shard_index(r["shard"])], opts)]
    skipped: Counter[str] = Counter()
    reencoded: Counter[str] = Counter()
    for r in reports:
        skipped.update(r["skipped"])
        reencoded.update(r["reencoded"])
    done = {r["shard"] for r in reports}
    missing = [records.shard_name(prefix, i, count) for i in range(count)]
    missing = [m for m in missing if m not in done]
    summary = {
        "shards": count, "shards_done": len(reports) - len(stale), "missing": missing[:20], "failed": list(failed),
        "stale": stale[:20], "stale_count": len(stale),
        "samples": sum(r["samples"] for r in reports), "written": sum(r["written"] for r in reports),
        "skipped": dict(sorted(skipped.items())), "reencoded": dict(sorted(reencoded.items())),
        "metadata_dropped": sum(r.get("metadata_dropped", 0) for r in reports),
        "bytes": sum(r["bytes"] for r in reports),
    }
    _write_json(epath.Path(out) / "reports" / f"{prefix}-summary.json", summary)
    return summary


def prepare(fmt: str, inputs: Sequence[str], out: str, *, image_root: str | None = None, shard_size: int = 10_000,
            min_size: int = 32, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, prefix: str = "train",
            fields: Sequence[str | None] = TABLE_FIELDS) -> tuple[list[Task], Options]:
    """Checks the arguments and plans every shard of the data set: what a driver (`convert`, or the Beam pipeline of
    beam_convert.py) starts from."""
    for flag, value in (("--shard-size", shard_size), ("--max-image-bytes", max_image_bytes)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if not prefix or "/" in prefix or prefix != prefix.strip():
        raise ValueError(f"--prefix {prefix!r} begins each shard's file name: a name without '/' or surrounding "
                         "spaces (a folder is --out)")
    if epath.Path(out).exists() and not epath.Path(out).is_dir():
        raise ValueError(f"--out {out} is a file: name a folder for the shards (a new one, or the one a previous "
                         "run of this command wrote)")
    tasks = plan(fmt, inputs, image_root, shard_size, fields)
    if not tasks:
        raise ValueError(f"{', '.join(inputs)}: no samples to convert")
    return tasks, Options(out, prefix, len(tasks), min_size, max_image_bytes)


def check_same_set(tasks: Sequence[Task], opts: Options, mine: Sequence[Task] | None = None) -> None:
    """Refuses an `out` that holds another data set under this prefix, before anything is written: shards of another
    count (other inputs, or another --shard-size), a shard whose report names another input than this command makes
    it from (any machine's slice: the set is one), or, among the shards this run writes (`mine`, default all), one
    without a report whose records are of other rows (copied there: `_of_other_rows`; one of this command's whose
    conversion stopped between the shard and its report is redone). The new shards would replace some of the old
    ones and sit beside the rest, and training reads every shard there. (A re-run of the same command redoes only the
    shards whose input changed.)"""
    folder = epath.Path(opts.out)
    if not folder.is_dir():
        return
    shards = {p.name for p in folder.iterdir()}
    counts = sorted({int(m["count"]) for name in shards
                     if (m := records.SHARD_RE.match(name)) and m["prefix"] == opts.prefix})
    other = next((n for n in counts if n != opts.count), None)
    if other is not None:
        raise ValueError(f"--out {opts.out} holds a set of {other} '{opts.prefix}' shards, and these inputs make "
                         f"{opts.count}: convert into a new folder (or name this set with another --prefix)")
    reports_dir = folder / "reports"
    reported = {p.name for p in reports_dir.iterdir()} if reports_dir.is_dir() else set()
    for task in tasks:
        report = report_path(opts, task.index)
        source = json.loads(report.read_text()).get("input") if report.name in reported else None
        if source is not None and canonical_path(source) != canonical_path(task.source):
            raise ValueError(f"--out {opts.out}: its shard {task.index} was converted from {source}, and these inputs "
                             f"make it from {task.source}: convert into a new folder (or name this set with another "
                             "--prefix)")
    for task in tasks if mine is None else mine:
        name, report = records.shard_name(opts.prefix, task.index, opts.count), report_path(opts, task.index).name
        if name in shards and report not in reported and _of_other_rows(folder / name, task):
            raise ValueError(f"--out {opts.out} holds {name} without its report (reports/{report}), whose records "
                             "are not of these inputs' rows: shards copied there from another set? Convert into a "
                             f"new folder, or remove {name} to convert it here")


def _of_other_rows(shard: epath.Path, task: Task) -> bool:
    """Whether a shard without a report holds another set's records: its first record's key is none of the task's
    rows'. Else it is this command's, from a run that stopped between the shard and its report, and it is redone. (A
    tar's samples are known only by reading it: such a shard is redone.)"""
    if task.rows is None:
        return False
    try:
        source = records.open_shards([os.fspath(shard)])
        key = records.decode_record(source[0]).get("key") if len(source) else None
    except Exception:  # noqa: BLE001 - unreadable (cut short): this command's, interrupted; redone
        return False
    return key is not None and key not in {row.key for row in task.rows}


def convert(fmt: str, inputs: Sequence[str], out: str, *, image_root: str | None = None, workers: int = 1,
            shard_index: int = 0, num_shards: int = 1, shard_size: int = 10_000, min_size: int = 32,
            max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, prefix: str = "train",
            fields: Sequence[str | None] = TABLE_FIELDS,
            progress: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Converts this machine's slice (shards i with i % num_shards == shard_index) and returns the summary over
    every report in `out`, plus `this_run`: the totals of this slice's shards (done now or before). A shard that
    fails as a whole (a write error) is reported in `failed` after the others finish; the next run retries it."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index {shard_index} must be in [0, --num-shards {num_shards}): shard indices "
                         "count from 0")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    tasks, opts = prepare(fmt, inputs, out, image_root=image_root, shard_size=shard_size, min_size=min_size,
                          max_image_bytes=max_image_bytes, prefix=prefix, fields=fields)
    mine = [t for t in tasks if t.index % num_shards == shard_index]
    if not mine:
        raise ValueError(f"--shard-index {shard_index} of --num-shards {num_shards} gets no shard: the inputs make "
                         f"{len(tasks)} shards; use --num-shards {len(tasks)} or fewer")
    check_same_set(tasks, opts, mine)
    epath.Path(out).mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    failed: list[dict] = []
    finished: list[dict] = []

    def done(task: Task, report: dict | None, error: BaseException | None) -> None:
        if error is not None:
            failed.append(failure(task, opts, error))
            report = failed[-1]
        else:
            finished.append(report)
        if progress:
            progress(report)

    with sigterm_raises(KeyboardInterrupt):  # interrupts the conversion as a Ctrl-C does
        try:
            if workers == 1:
                for task in mine:
                    done(*_convert_task((task, opts)))
            else:
                _convert_in_workers(mine, opts, workers, done)
        except BaseException:  # a Ctrl-C or SIGTERM: what this process was writing goes
            remove_temporaries(out, os.getpid())
            raise
    return summarize(out, prefix, opts.count, failed, tasks, opts) | {"this_run": run_totals(finished)}


class ShardFailed(Exception):
    """A shard's failure as a whole, carried back from a worker process as its text (the exception itself may not
    pickle)."""

    def __str__(self) -> str:
        return self.args[0]


def failure_text(error: BaseException) -> str:
    return str(error) if isinstance(error, ShardFailed) else f"{type(error).__name__}: {error}"


def _convert_task(job: tuple[Task, Options]) -> tuple[Task, dict | None, BaseException | None]:
    task, opts = job
    try:
        return task, convert_shard(task, opts), None
    except Exception as e:  # noqa: BLE001 - reported with the summary; the other shards still convert
        return task, None, ShardFailed(failure_text(e))


def _convert_in_workers(tasks: Sequence[Task], opts: Options, workers: int,
                        done: Callable[[Task, dict | None, BaseException | None], None]) -> None:
    """Converts `tasks` in `workers` processes. A Ctrl-C or SIGTERM here stops them before it ends this process: a
    worker's shard in progress is aborted (its temporary file removed). Left running, they went on converting after
    the command had said "interrupted", then waited forever for a parent that had gone. (A worker that dies, killed
    for memory say, fails the shards in flight: BrokenProcessPool, which a multiprocessing.Pool would wait out.)"""
    # spawn: the parent may have imported jax (via the CLI), whose threads do not survive fork
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_signals) as pool:
        try:
            futures = {pool.submit(_convert_task_in_worker, (task, opts)): task for task in tasks}
            for future in concurrent.futures.as_completed(futures):
                error = future.exception()  # (a worker that died: BrokenProcessPool)
                if error is None:
                    done(*future.result())
                else:
                    done(futures[future], None, error)
        except BaseException:
            # the executor has no public way to stop its workers before Python 3.14 (terminate_workers)
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()  # SIGTERM: `_worker_signals` makes the worker abort its shard
            pool.shutdown(wait=True, cancel_futures=True)  # (joined: else its semaphores are reported leaked)
            raise


def _convert_task_in_worker(job: tuple[Task, Options]) -> tuple[Task, dict | None, BaseException | None]:
    try:
        return _convert_task(job)
    except SystemExit as stop:  # the parent stops this worker (`_worker_signals`)
        remove_temporaries(job[1].out, os.getpid())  # (its shard is aborted by now, unless the signal came between)
        os._exit(stop.code)  # the executor's worker loop would catch a SystemExit and go on to the next shard


def _worker_signals() -> None:
    # A terminal's Ctrl-C reaches every process of its group: the parent alone decides, and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_exit)
    sys.unraisablehook = _quiet_stop


def _quiet_stop(unraisable) -> None:
    """The stop's SystemExit, swallowed in a gc callback, is not a traceback on the console: `convert_shard` raises
    it again. Anything else is reported as Python does."""
    if not (isinstance(unraisable.exc_value, SystemExit) and _stop_code is not None):
        sys.__unraisablehook__(unraisable)


# A worker's stop (`_raise_exit`), also kept here: raised inside a gc callback (jax registers one), the exception is
# printed and ignored, so `convert_shard` looks at this between samples too.
_stop_code: int | None = None


def _raise_exit(signum, frame) -> NoReturn:
    global _stop_code
    # Once: the executor sends another SIGTERM to the workers left when one has ended, which would cut the unwinding.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _stop_code = 128 + signum
    raise SystemExit(_stop_code)  # unwinds the shard being written: ShardWriter removes its temporary file


def remove_stale_temporaries(out: str) -> None:
    """Removes the temporary files (`NAME.tmp-HOST-PID`: a shard or report being written) that a conversion on this
    host left when it was killed at once (SIGKILL, a power cut): those of a process id that runs no process here.
    Another host's are left alone: it may be writing them now."""
    remove_temporaries(out, None)


def remove_temporaries(out: str, pid: int | None) -> None:
    """Removes this host's temporary files in `out` of process `pid`, or (None) of every process id not running."""
    marker = re.compile(rf"\.tmp-{re.escape(socket.gethostname())}-(\d+)$")
    for folder in (epath.Path(out), epath.Path(out) / "reports"):
        for path in folder.iterdir() if folder.is_dir() else ():
            if not (m := marker.search(path.name)):
                continue
            if int(m[1]) == pid if pid is not None else not process_running(int(m[1])):
                path.unlink(missing_ok=True)


def process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def progress_line(report: dict[str, Any]) -> str:
    """One line on a shard just done: its counts, that it was resumed, or why it failed (a `failure` entry)."""
    if "error" in report:
        return f"{report['shard']}: FAILED ({report['input']}): {report['error']}"
    if report.get("resumed"):
        return f"{report['shard']}: converted before from the same input, skipped"
    skipped = ", ".join(f"{k} {v}" for k, v in report["skipped"].items()) or "none"
    dropped = report.get("metadata_dropped", 0)
    metadata = f"; {dropped} kept without their .json metadata, which is not JSON" if dropped else ""
    redone = f"; converted again: {report['redone']}" if report.get("redone") else ""
    return (f"{report['shard']}: {report['written']} of {report['samples']} samples written in {report['seconds']} s "
            f"(skipped: {skipped}){metadata}{redone}")


def run_totals(reports: Sequence[dict]) -> dict[str, Any]:
    """Samples, written and skipped counts (with the first example per reason) of the shards of one run."""
    skipped: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for r in reports:
        skipped.update(r["skipped"])
        for reason, keys in r["examples"].items():
            examples.setdefault(reason, keys[0])
    return {"shards": len(reports), "samples": sum(r["samples"] for r in reports),
            "written": sum(r["written"] for r in reports), "skipped": dict(skipped.most_common()),
            "examples": examples}
