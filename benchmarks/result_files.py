"""Where a benchmark run saves its JSON: never over an earlier run's (the figures the docs cite are those files)."""

from __future__ import annotations

import pathlib


def new_result_path(path: str | pathlib.Path) -> pathlib.Path:
    """`path`, or if a file is there already the first free `<stem>_2<suffix>`, `_3`, ...: a run repeated, or run
    with options its file name does not record, keeps the earlier results."""
    path = pathlib.Path(path)
    candidates = (path.with_name(f"{path.stem}{suffix}{path.suffix}") for suffix in ("", *(f"_{n}" for n in
                                                                                            range(2, 10_000))))
    return next(p for p in candidates if not p.exists())
