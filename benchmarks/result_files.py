"""Where a benchmark run saves its results, and its counts, checked before it measures anything.

A run saves its JSON under a name no earlier run's file has (the figures the docs cite are those files), and its
`--out` is checked at start-up: a path that cannot be written fails in one line before minutes of measuring, not
after. Every script's `--out` means the same: a script that writes one file takes a file path or an existing folder
(the default file name inside it); a script that writes several files takes a folder.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile


def new_result_path(path: str | pathlib.Path) -> pathlib.Path:
    """`path`, or if a file is there already the first free `<stem>_2<suffix>`, `_3`, ...: a run repeated, or run
    with options its file name does not record, keeps the earlier results."""
    path = pathlib.Path(path)
    return path.with_name(new_result_stem(path.parent, path.stem, (path.suffix,)) + path.suffix)


def new_result_stem(folder: str | pathlib.Path, stem: str, suffixes: tuple[str, ...]) -> str:
    """`stem`, or the first of `<stem>_2`, `_3`, ... that no file `<stem><suffix>` in `folder` has for any of
    `suffixes`: the name of a set of files saved together (a trace and its HLO) that an earlier run's set keeps."""
    folder = pathlib.Path(folder)
    for candidate in (stem, *(f"{stem}_{n}" for n in range(2, 10_000))):
        if not any((folder / f"{candidate}{suffix}").exists() for suffix in suffixes):
            return candidate
    raise FileExistsError(f"{folder}: {stem}_2 to _9999 are all taken")


def _writable_folder(folder: pathlib.Path, option: str) -> pathlib.Path:
    """`folder`, made if missing, once a file could be created in it; else exits naming `option` and why."""
    if folder.exists() and not folder.is_dir():
        sys.exit(f"{option} {folder}: a file is there, and this needs a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # the test that holds on read-only mounts and for root too
            pass
    except OSError as e:
        sys.exit(f"{option} {folder}: cannot write there ({e.strerror or e})")
    return folder


def checked_out_folder(out: str | os.PathLike, option: str = "--out") -> pathlib.Path:
    """The folder a script saves its files in (`out`), made if missing, checked writable at start-up; exits with
    one line naming `option` where it is a file or cannot be written."""
    return _writable_folder(pathlib.Path(out), option)


def checked_out_file(out: str | os.PathLike | None, default: str | os.PathLike, replace: bool = False
                     ) -> pathlib.Path:
    """The file a script saves its result in, checked at start-up: `out` itself, or `default`'s name inside `out`
    where `out` is an existing folder (or ends in a slash), or `default` where `out` is not given; its folder made
    if missing and checked writable; a free name (`new_result_path`) where a file is there already, unless
    `replace` (a result regenerated in place on purpose, or read back and extended). Exits with one line naming
    --out where the path cannot be written."""
    default = pathlib.Path(default)
    if out is None or str(out) == "":
        path = default
    elif pathlib.Path(out).is_dir() or str(out).endswith(("/", os.sep)):
        path = pathlib.Path(out) / default.name
    else:
        path = pathlib.Path(out)
    _writable_folder(path.parent, "--out")
    if replace and path.exists() and not os.access(path, os.W_OK):
        sys.exit(f"--out {path}: cannot write over it (permission denied)")
    return path if replace else new_result_path(path)


def count(text: str) -> int:
    """An argparse type for a count of steps, passes, examples...: 1 or more (0 timed steps gave a NaN median in a
    result JSON), refused by the parser in one line naming the option."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive(text: str) -> float:
    """An argparse type for a duration or a rate: above 0, refused by the parser in one line naming the option."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def fraction(text: str) -> float:
    """An argparse type for a share: within [0, 1]."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {text}")
    return value
