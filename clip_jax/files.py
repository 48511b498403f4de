"""Workdir files that a crash never leaves half-written, and the errors of a file system that takes no more writes.
Paths go through etils.epath, so a workdir may be a bucket (`gs://...`); pathlib would turn gs://bucket/run into
gs:/bucket/run."""

from __future__ import annotations

import errno
import json
import math
import os
import pathlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from etils import epath

from clip_jax.errors import ConfigError


def is_remote(path: epath.PathLike) -> bool:
    """A URI (gs://, s3://, ...) rather than a local path."""
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", os.fspath(path)) is not None


def visible_files(folder: epath.PathLike, _seen: set[str] | None = None) -> Iterator[epath.Path]:
    """The files under `folder` at any depth, hidden entries left out at every depth (a notebook's
    .ipynb_checkpoints/ copies, macOS's ._x.jpg, .git/): what a user means by "the files of this folder". Walked
    folder by folder (epath refuses `**` globs, which would cost a request per folder on GCS anyway); a linked folder
    is read once, wherever it is reached from (a link to a folder above would loop)."""
    folder = epath.Path(folder)
    seen = set() if _seen is None else _seen
    real = str(folder) if is_remote(folder) else os.path.realpath(folder)
    if real in seen:
        return
    seen.add(real)
    for path in folder.iterdir():
        if path.name.startswith("."):
            continue
        if path.is_dir():
            yield from visible_files(path, seen)
        else:
            yield path


def file_stamp(path: epath.PathLike) -> dict[str, int | float]:
    """Size and modification time of a file: what tells that it changed (a bucket's object: to the second)."""
    if is_remote(path):
        st = epath.Path(path).stat()
        return {"size": st.length, "mtime": st.mtime}
    try:
        st = os.stat(path)
    except FileNotFoundError:  # a dangling link (in a folder of images, say): the link's own stamp
        st = os.lstat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_atomic(path: epath.PathLike, data: str | bytes) -> None:
    """Writes `data` (text as UTF-8) to `path` whole or not at all: a process killed meanwhile, or a full disk,
    leaves the previous content (or no file), never a torn one that the next launch fails to read.

    A local file is written beside its destination under a temporary name, flushed to disk, then renamed over it
    (a rename within one folder is atomic on POSIX file systems). An object store makes a new object visible only
    once it has been uploaded whole, so there it is written directly: a rename would be a second, non-atomic copy.
    """
    path = epath.Path(path)
    content = data.encode("utf-8") if isinstance(data, str) else data
    if is_remote(path):
        path.write_bytes(content)
        return
    tmp = path.parent / f".{path.name}.tmp"  # one name: the next write reuses what a killed one left
    if not path.parent.is_dir():  # else the error would name the temporary file
        raise FileNotFoundError(errno.ENOENT, f"no such folder to write {path.name} into", os.fspath(path.parent))
    try:
        with open(tmp, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())  # the data on disk before the name points at it: else a power cut may leave it empty
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# TensorStore, which writes the arrays (in C++), quotes the operating system's error in its message as
# `...: No space left on device [os_error_code='28']`.
_OS_ERROR_CODE = re.compile(r"\[os_error_code='?(\d+)'?\]")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message is one line that says what to do."""


def results_json(results: Any) -> str:
    """A results file's text: JSON that strict parsers read (jq, JavaScript, Go), with a figure that has no value
    (NaN: the IoU of a class absent from every image, a top-1 over no images) written as null, not Python's bare NaN."""

    def strict(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strict(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [strict(v) for v in value]
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    return json.dumps(strict(results), indent=2, allow_nan=False) + "\n"


def is_workdir(path: str | os.PathLike) -> bool:
    """A clip_jax workdir: a config.json of ours (not a Hugging Face export's: those have model_type) or Orbax
    step folders under checkpoints/ (a run makes them before its config.json). Both are told by content: a user's
    folder of downloaded `checkpoints/` or another tool's config.json is not a workdir."""
    path = epath.Path(path)  # a run's workdir may be a bucket
    if (path / "config.json").is_file():
        try:
            data = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None  # not ours, or a damaged one: its checkpoints/ still tell
        if isinstance(data, dict) and isinstance(data.get("model"), dict) and "model_type" not in data:
            return True
    steps = path / "checkpoints"
    return steps.is_dir() and any(p.name.split(".")[0].isdigit() for p in steps.iterdir())


def refuse_inside_workdir(path: str | os.PathLike, flag: str, source: str | os.PathLike | None = None) -> None:
    """A ConfigError naming `flag` if the local `path` is, or lies inside, a clip_jax workdir (or the `source`
    folder, a workdir being read): a command's output or a new workdir there would mix with the run's files or
    overwrite them."""
    if is_remote(path):
        return
    source = pathlib.Path(source).resolve() if source is not None else None
    resolved = pathlib.Path(path).resolve()
    for folder in (resolved, *resolved.parents):
        if folder == source or is_workdir(folder):
            where = "is" if folder == resolved else "lies inside"
            raise ConfigError(f"{flag} {path} {where} the clip_jax workdir {folder}; give a path outside it")


RUN_FOLDERS = ("checkpoints", "checkpoints_unreadable", "tensorboard")  # what a run keeps in folders of its workdir


def refuse_run_files(path: str | os.PathLike, flag: str, workdir: str | os.PathLike | None = None, *,
                     is_file: bool) -> None:
    """An evaluation's output (`flag`: a file, or a folder of PNGs) may go in a folder of its own inside a clip_jax
    workdir (W/overlays, W/coco/results.json), never where the run keeps its files: the workdir itself, a file at its
    top level (config.json, results.json, ...), or its checkpoints/ and tensorboard/. `workdir` is the run's, which a
    first launch has not made yet."""
    if is_remote(path):
        return
    resolved = pathlib.Path(path).resolve()
    own = pathlib.Path(workdir).resolve() if workdir is not None else None
    for folder in (resolved, *resolved.parents):
        if folder == own or is_workdir(folder):
            inside = resolved.relative_to(folder).parts
            if len(inside) < (2 if is_file else 1) or inside[0] in RUN_FOLDERS:
                raise ConfigError(f"{flag} {path} is where the clip_jax run in {folder} keeps its own files; name a "
                                  f"folder of its own inside the run (e.g. {folder / 'evaluations'}) or outside it")
            return


def canonical_path(path: str | os.PathLike) -> str:
    """One spelling per file, to compare paths: a bucket's as given, a local one absolute with links resolved."""
    return os.fspath(path) if is_remote(path) else os.path.realpath(path)


def absolute_path(path: str) -> str:
    """A local path made absolute against the current folder (links kept as given); a URI and "" as they are."""
    return path if not path or is_remote(path) else os.path.abspath(path)


def same_setting(old: Any, new: Any) -> bool:
    """Whether two config values (JSON trees) are one setting. A relative path, as config.json held it before
    `config.absolute_paths`, is its absolute form against the current folder (the folder that version resolved it
    from), item by item in a comma-separated list."""
    if isinstance(old, dict) and isinstance(new, dict):
        return old.keys() == new.keys() and all(same_setting(old[k], new[k]) for k in old)
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(map(same_setting, old, new))
    if isinstance(old, str) and isinstance(new, str) and old != new:
        if absolute_path(old) == new:  # one path (a comma may be part of its name)
            return True
        olds, news = old.split(","), new.split(",")
        return len(olds) == len(news) and all(absolute_path(o.strip()) == n.strip()
                                              for o, n in zip(olds, news, strict=True))
    return old == new


def diff_settings(a: dict, b: dict, prefix: str = "model") -> list[str]:
    """The settings of two config trees that differ (`same_setting`), as "model.text.width: 512 -> 768", sorted."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_settings(va, vb, f"{prefix}.{k}")
        elif not same_setting(va, vb):
            out.append(f"{prefix}.{k}: {va!r} -> {vb!r}")
    return out


def refuse_folder_name(out: epath.PathLike, flag: str = "--out") -> None:
    """A file output named as a folder (`results/`): epath (and open) would make it a file of that name. Checked on
    the path as given, before a Path drops the '/'."""
    if str(out).endswith(("/", os.sep)):
        raise ConfigError(f"{flag} {out} ends in a '/', as a folder's name: give the path of the file to write")


def refuse_replacing(out: epath.PathLike, earlier_output: Callable[[epath.Path], bool],
                     inputs: Sequence[str | os.PathLike] = (), flag: str = "--out", by: str = "command") -> None:
    """A command's single-file --out (or an evaluation's output file: `flag` names the key, `by` the writer),
    checked before any work: not a folder, not one of the command's `inputs`, and if it exists, an earlier output of
    the command (`earlier_output` tells by content): anything else is what the user made, and writing it would
    destroy it."""
    refuse_folder_name(out, flag)
    out = epath.Path(out)
    if out.is_dir():
        raise ConfigError(f"{flag} {out} is a folder; give the path of the file to write")
    if not out.exists():
        return
    if not is_remote(out) and any(os.path.samefile(out, p) for p in inputs if os.path.exists(p)):
        raise ConfigError(f"{flag} {out} is one of the {by}'s inputs: name a new file for the results")
    try:
        ours = earlier_output(out)
    except (OSError, ValueError):  # unreadable, or not text: not ours
        ours = False
    if not ours:
        raise ConfigError(f"{flag} {out} exists and is not an earlier output of this {by}: name a new file, or "
                          "remove it first")


def os_error(error: BaseException) -> str | None:
    """`ENOSPC: No space left on device` for the operating system's error behind a failed write (an OSError in the
    exception chain, or one that TensorStore quotes), or None when the failure is not the file system's."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code = error.errno if isinstance(error, OSError) else None
        if code is None and (match := _OS_ERROR_CODE.search(str(error))):
            code = int(match.group(1))
        if code:
            return f"{errno.errorcode.get(code, code)}: {os.strerror(code)}"
        error = error.__cause__ or error.__context__
    return None
