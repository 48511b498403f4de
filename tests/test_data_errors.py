"""Paths and inputs that are not what the data commands expect: a FIFO or a device where an image should be (never
read: it would block or never end), image files over the byte cap, decompression bombs, inputs changed since they
were converted, bad rows reported by the file's line, a conversion that writes nothing, and wrong paths given to
`data inspect` / `data convert`: each a skipped sample or a one-line error, never a hang or a traceback."""

import contextlib
import io
import json
import os
import pathlib
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib

import grain
import ml_collections
import numpy as np
import pytest
from PIL import Image

from clip_jax import cli
from clip_jax.data import convert, records
from clip_jax.data.images import RefusedFile, list_images, load_image, read_image_file
from clip_jax.data.pipeline import DecodeExample
from clip_jax.train.loop import Trained
from tests.test_end_to_end import exit_message

CAP = 4000  # --max-image-bytes of these tests: above SMALL's size, below BIG's
TIMEOUT = 120  # a command that reads a FIFO waits for a writer forever: fail instead


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


SMALL = png(np.full((40, 48, 3), 90, np.uint8))  # ~100 bytes
BIG = png(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))  # ~12 KB of noise


def bomb_png() -> bytes:
    """A PNG header claiming 20000 x 20000 pixels (beyond PIL's decompression-bomb limit) in 60 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def bad_paths_folder(folder):
    """good.png, and beside it a FIFO, a link to /dev/zero, a file over CAP and a decompression bomb, all named as
    images."""
    folder.mkdir()
    (folder / "good.png").write_bytes(SMALL)
    os.mkfifo(folder / "fifo.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    (folder / "big.png").write_bytes(BIG)
    (folder / "bomb.png").write_bytes(bomb_png())
    return folder


@contextlib.contextmanager
def deadline(seconds: int):
    """Fails the test with TimeoutError if the block still runs after `seconds` (an open() of a FIFO blocks)."""
    def fail(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# `python -m clip_jax` under a memory limit: a converter reading /dev/zero without limit then fails with MemoryError
# instead of filling the machine (set in the child itself: a preexec_fn would fork this multithreaded process).
CLI = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
       "sys.argv[0] = 'clip-jax'; runpy.run_module('clip_jax', run_name='__main__', alter_sys=True)")


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a failed command printed on stderr (asserting it failed, in one line, without a traceback)."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


# --- Paths that are not image files ---------------------------------------------------------------------------


def test_read_image_file_refuses_special_files_and_files_over_the_cap(tmp_path):
    folder = bad_paths_folder(tmp_path / "images")
    with deadline(30):
        assert read_image_file(folder / "good.png", CAP) == SMALL
        for name in ("fifo.png", "zero.png"):
            with pytest.raises(RefusedFile, match="not a regular file") as info:
                read_image_file(folder / name, CAP)
            assert info.value.reason == "not_a_regular_file"
        with pytest.raises(RefusedFile, match=f"{len(BIG)} bytes, over the limit of {CAP}") as info:
            read_image_file(folder / "big.png", CAP)
        assert info.value.reason == "file_too_large"
        with pytest.raises(RefusedFile, match="a directory"):
            read_image_file(folder, CAP)


def test_encode_skips_special_files_big_files_and_bombs_with_a_warning(tmp_path, monkeypatch, capsys):
    """`encode --images` over a folder holding a FIFO, a link to /dev/zero, a file over --max-image-bytes and a
    decompression bomb (and /dev/zero named directly): each is a warning and a skipped file, the good image is
    encoded. The model is a stand-in: what is tested is which files reach it."""
    folder = bad_paths_folder(tmp_path / "images")
    config = ml_collections.ConfigDict({"model": {"vision": {"image_size": 16}, "text": {"context_length": 8}}})
    encoded = []

    class Encoder:
        batch_size = 256

        def __init__(self, *args):
            pass

        def images(self, pixels):
            encoded.append(pixels)
            return np.ones((len(pixels), 4), np.float32)

    monkeypatch.setattr("clip_jax.train.loop.load_trained",
                        lambda workdir, step=None: Trained(config, None, None, None, None, None, 0))
    monkeypatch.setattr("clip_jax.evaluate.encoder.Encoder", Encoder)
    out = tmp_path / "out"
    with deadline(60):
        cli.main(["encode", "--workdir", str(tmp_path / "run"), "--images", str(folder), "/dev/zero", "--out",
                  str(out), "--max-image-bytes", str(CAP)])
    captured = capsys.readouterr()
    assert (out / "image_files.txt").read_text().splitlines() == [str(folder / "good.png")]
    assert len(encoded) == 1 and encoded[0].shape == (1, 16, 16, 3)
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 5 and "Traceback" not in captured.err, captured.err
    for name, why in [("fifo.png", "is a FIFO"), ("zero.png", "is a character device"), ("big.png", "over the limit"),
                      ("bomb.png", "too_large"), ("/dev/zero", "is a character device")]:
        assert any(name in w and why in w for w in warnings), (name, warnings)
    assert "5 undecodable files skipped" in captured.out


def test_load_image_reports_a_decompression_bomb_as_a_bad_file(tmp_path):
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    with pytest.raises(ValueError, match="bomb.png.*too_large"):
        load_image(tmp_path / "bomb.png", 16)
    assert list_images([str(tmp_path / "bomb.png"), "/dev/zero"])[1].name == "zero"  # load_image says why, later


def test_convert_skips_special_files_big_files_and_bombs(tmp_path):
    folder = bad_paths_folder(tmp_path / "images")
    names = ["good.png", "fifo.png", "zero.png", "big.png", "bomb.png"]
    (folder / "captions.json").write_text(json.dumps({n: f"caption of {n}" for n in names}))
    out = tmp_path / "out"
    result = run_cli("data", "convert", "--format", "folder", folder, "--out", out, "--max-image-bytes", CAP)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    report = json.loads((out / "reports" / "train-00000-of-00001.json").read_text())
    assert report["written"] == 1 and report["samples"] == 5
    assert report["skipped"] == {"file_too_large": 1, "not_a_regular_file": 2, "too_large": 1}
    assert any("fifo.png is a FIFO" in e for e in report["examples"]["not_a_regular_file"])


def test_training_drops_special_files_and_files_over_the_cap(tmp_path):
    folder = bad_paths_folder(tmp_path / "images")
    decode = DecodeExample(16, 16, max_bytes=CAP)
    with deadline(30):
        kept = {name: decode.map({"path": str(folder / name), "long_caption": "c", "key": name})
                for name in ("good.png", "fifo.png", "zero.png", "big.png", "bomb.png")}
    assert [name for name, example in kept.items() if example is not None] == ["good.png"]
    assert decode.__getstate__()["max_bytes"] == CAP  # grain's worker processes get the cap too


def test_training_reads_the_cap_from_the_config(tmp_path, monkeypatch):
    from clip_jax.config import default_config
    from clip_jax.data import pipeline

    caps = []

    class Recording(DecodeExample):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caps.append(self.max_bytes)

    monkeypatch.setattr(pipeline, "DecodeExample", Recording)
    (tmp_path / "good.png").write_bytes(SMALL)
    write_jsonl(tmp_path / "l.jsonl", ["c"])
    config = default_config()
    with config.unlocked():
        config.data.source, config.data.path, config.data.max_image_bytes = "captions", str(tmp_path / "l.jsonl"), CAP
    pipeline.train_dataset(config, tokenizer=None)  # built, not read
    assert caps == [CAP]


# --- Re-runs after an input changed ---------------------------------------------------------------------------


def write_jsonl(path, captions):
    path.write_text("".join(json.dumps({"image": "good.png", "caption": c}) + "\n" for c in captions))


def captions_of(shard):
    return [records.decode_record(r)["caption"] for r in grain.sources.ArrayRecordDataSource([str(shard)])]


def test_a_rerun_redoes_the_shards_whose_input_changed(tmp_path, capsys):
    (tmp_path / "good.png").write_bytes(SMALL)
    table, out = tmp_path / "l.jsonl", tmp_path / "out"
    write_jsonl(table, ["old one", "old two"])
    argv = ["data", "convert", "--format", "jsonl", str(table), "--out", str(out)]
    cli.main(argv)
    capsys.readouterr()
    write_jsonl(table, ["new one", "new two"])  # same size: the time tells
    os.utime(table, ns=(table.stat().st_atime_ns, table.stat().st_mtime_ns + 10**9))
    cli.main(argv)
    assert "converted again: its input changed" in capsys.readouterr().out
    assert captions_of(out / "train-00000-of-00001.arrayrecord") == ["new one", "new two"]
    cli.main(argv)
    assert "converted before from the same input, skipped" in capsys.readouterr().out

    report_file = out / "reports" / "train-00000-of-00001.json"  # a report of an older version: no fingerprint
    report_file.write_text(json.dumps({k: v for k, v in json.loads(report_file.read_text()).items()
                                       if k != "input_fingerprint"}))
    cli.main(argv)
    assert "converted again: its report (from an older version) records no input fingerprint" in (
        capsys.readouterr().out)


def test_a_rerun_with_other_options_redoes_the_shard_and_the_same_one_from_another_folder_resumes(tmp_path,
                                                                                                  monkeypatch):
    """The fix an all-skipped conversion suggests (another --image-root) takes effect on the re-run; the same inputs
    spelt from another folder are the same conversion, and a report of a version that kept no recipe resumes."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "good.png").write_bytes(SMALL)
    write_jsonl(tmp_path / "l.jsonl", ["one", "two"])
    out = tmp_path / "out"

    def run(table, root, out, **options):
        seen = []
        convert.convert("jsonl", [str(table)], str(out), image_root=str(root), progress=seen.append, **options)
        return seen[0]

    assert run(tmp_path / "l.jsonl", tmp_path, out)["written"] == 0  # missing_file: the images are in imgs/
    redone = run(tmp_path / "l.jsonl", tmp_path / "imgs", out)
    assert redone["written"] == 2 and redone["redone"] == (
        "other options make it (--image-root, the columns, --min-size or --max-image-bytes)")
    monkeypatch.chdir(tmp_path / "imgs")
    assert run("../l.jsonl", ".", "../out").get("resumed")
    assert run("../l.jsonl", ".", "../out", min_size=64)["redone"].startswith("other options")
    report_file = out / "reports" / "train-00000-of-00001.json"
    report = json.loads(report_file.read_text())
    assert report["input"] == str(tmp_path / "l.jsonl")
    report_file.write_text(json.dumps({k: v for k, v in report.items() if k != "recipe"}))
    assert run(tmp_path / "l.jsonl", tmp_path / "imgs", out).get("resumed")  # min_size back at its default


def test_a_folder_converted_into_a_folder_inside_it_resumes(tmp_path):
    """The shards and reports written inside the input folder are not the input: a re-run skips the shard."""
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(SMALL)
    (folder / "a.txt").write_text("caption a")
    seen = []
    for _ in range(2):
        convert.convert("folder", [str(folder)], str(folder / "records"), min_size=1, progress=seen.append)
    assert [bool(r.get("resumed")) for r in seen] == [False, True] and seen[1]["written"] == 1


def test_another_data_set_into_the_same_out_is_refused(tmp_path, capsys):
    """Converted into a folder holding another set, the new shards replaced some of the old ones and sat beside the
    rest (other shard counts), all of which training reads."""
    (tmp_path / "good.png").write_bytes(SMALL)
    first, second, out = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "out"
    write_jsonl(first, ["one", "two"])
    write_jsonl(second, ["three", "four", "five"])
    cli.main(["data", "convert", "--format", "jsonl", str(first), "--out", str(out)])
    before = sorted(p.name for p in out.iterdir())
    message = exit_message(["data", "convert", "--format", "jsonl", str(second), "--out", str(out)], capsys)
    assert f"its shard 0 was converted from {first}, and these inputs make it from {second}" in message
    message = exit_message(["data", "convert", "--format", "jsonl", str(first), str(second), "--shard-size", "2",
                            "--out", str(out)], capsys)
    assert f"--out {out} holds a set of 1 'train' shards, and these inputs make 3" in message
    assert sorted(p.name for p in out.iterdir()) == before
    assert captions_of(out / "train-00000-of-00001.arrayrecord") == ["one", "two"]


def test_folder_and_tar_inputs_are_redone_when_they_change(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(SMALL)
    (folder / "a.txt").write_text("caption a")
    tar = tmp_path / "00000.tar"

    def write_tar(caption: bytes):
        with tarfile.open(tar, "w") as f:
            for name, data in (("k.png", SMALL), ("k.txt", caption)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                f.addfile(info, io.BytesIO(data))

    write_tar(b"first")

    def run(fmt, source, out):
        seen = []
        convert.convert(fmt, [str(source)], str(tmp_path / out), min_size=1, progress=seen.append)
        return seen[0]

    assert not run("folder", folder, "f").get("resumed") and run("folder", folder, "f").get("resumed")
    (folder / "b.png").write_bytes(SMALL)
    (folder / "b.txt").write_text("caption b")
    report = run("folder", folder, "f")
    assert report["redone"] and report["written"] == 2
    (folder / "a.txt").write_text("caption A")  # a sidecar caption rewritten: the folder changed
    os.utime(folder / "a.txt", ns=(0, (folder / "a.txt").stat().st_mtime_ns + 10**9))
    assert run("folder", folder, "f")["redone"]

    assert not run("webdataset", tar, "t").get("resumed") and run("webdataset", tar, "t").get("resumed")
    write_tar(b"second")
    os.utime(tar, ns=(0, tar.stat().st_mtime_ns + 10**9))
    assert run("webdataset", tar, "t")["redone"]
    assert captions_of(tmp_path / "t" / "train-00000-of-00001.arrayrecord") == ["second"]


# --- Bad rows by line -----------------------------------------------------------------------------------------


def test_bad_rows_are_reported_by_the_files_line_number(tmp_path):
    (tmp_path / "good.png").write_bytes(SMALL)
    # line 1 header, 2 blank, 3-4 one row (a quoted caption over two lines), 5 no image, 6 blank, 7 good, 8 no image
    (tmp_path / "l.csv").write_text('image,caption\n\ngood.png,"two\nlines"\n,no image\n\ngood.png,c\n,again\n')
    # line 1 blank, 2 good (a caption holding U+2028, which JSON allows unescaped), 3 not JSON, 4 blank, 5 no image
    (tmp_path / "l.jsonl").write_text('\n{"image": "good.png", "caption": "a\u2028b"}\nnot json\n\n{"caption": 1}\n')
    for name, lines, written in (("l.csv", [5, 8], 2), ("l.jsonl", [3, 5], 1)):
        fmt = name.split(".")[1]
        summary = convert.convert(fmt, [str(tmp_path / name)], str(tmp_path / fmt), min_size=1)
        report = json.loads((tmp_path / fmt / "reports" / "train-00000-of-00001.json").read_text())
        assert report["examples"]["bad_row"] == [f"{name} line {n}" for n in lines]
        assert summary["written"] == written


def test_a_quote_never_closed_is_reported_and_a_long_or_quoted_caption_is_kept(tmp_path):
    """A stray opening quote made the lenient CSV reader take every later row into one caption, silently; a caption
    over 128 KiB (the csv module's default cell limit) stopped the conversion. Neither is a reason to lose a row
    whose quoting is only unusual: an inch mark inside a cell, a quoted cell with text after it."""
    (tmp_path / "good.png").write_bytes(SMALL)
    long = "a very long caption " * 8000  # 160,000 characters
    (tmp_path / "l.csv").write_text(f'image,caption\ngood.png,a 12" ruler\ngood.png,"quoted" tail\ngood.png,{long}\n'
                                    'good.png,"open quote, never closed\ngood.png,swallowed\ngood.png,too\n')
    summary = convert.convert("csv", [str(tmp_path / "l.csv")], str(tmp_path / "out"), min_size=1)
    assert summary["written"] == 3 and summary["skipped"] == {"unclosed_quote": 1}
    report = json.loads((tmp_path / "out" / "reports" / "train-00000-of-00001.json").read_text())
    assert report["examples"]["unclosed_quote"] == ["l.csv line 5"]
    assert captions_of(tmp_path / "out" / "train-00000-of-00001.arrayrecord") == [
        'a 12" ruler', "quoted tail", long.strip()]


def test_a_row_with_more_cells_than_the_header_is_counted_not_cut(tmp_path):
    """An unquoted comma in a CSV caption (a tab in a TSV one) gave the row a cell more than the header: the reader
    kept the caption up to the comma and dropped the rest, silently. Empty extra cells (a trailing delimiter) are no
    reason to lose a row."""
    (tmp_path / "good.png").write_bytes(SMALL)
    (tmp_path / "l.csv").write_text('image,caption\ngood.png,a red circle, small, on grey\ngood.png,"quoted, kept"\n'
                                    "good.png,trailing comma,\n")
    (tmp_path / "l.tsv").write_text("image\tcaption\ngood.png\ta tab\tinside\ngood.png\tkept\n")
    for name, kept in (("l.csv", ["quoted, kept", "trailing comma"]), ("l.tsv", ["kept"])):
        fmt = name.split(".")[1]
        summary = convert.convert(fmt, [str(tmp_path / name)], str(tmp_path / fmt), min_size=1)
        assert summary["skipped"] == {"extra_cells": 1}, name
        report = json.loads((tmp_path / fmt / "reports" / "train-00000-of-00001.json").read_text())
        assert report["examples"]["extra_cells"] == [f"{name} line 2"]
        assert captions_of(tmp_path / fmt / "train-00000-of-00001.arrayrecord") == kept


# --- Commands that would do nothing, or cannot start ----------------------------------------------------------


def test_a_conversion_that_writes_nothing_fails_and_says_why(tmp_path):
    (tmp_path / "l.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "caption": "c"}) + "\n"
                                              for i in range(3)))
    result = run_cli("data", "convert", "--format", "jsonl", tmp_path / "l.jsonl", "--out", tmp_path / "out")
    line = error_line(result)
    assert "no sample written" in line and "missing_file 3" in line and "0.png" in line


@pytest.mark.parametrize("case, expected", [
    ("inspect_missing", "does not exist (data inspect reads the shards"),
    ("inspect_empty_folder", "no .arrayrecord shards in"),
    ("inspect_not_a_shard", "not_a_shard.arrayrecord is not an ArrayRecord shard"),
    ("convert_missing_input", "missing.jsonl does not exist: check the path"),
    ("convert_out_is_a_file", "is a file: name a folder for the shards"),
    ("convert_folder_as_table", "is a folder: --format jsonl reads files"),
    ("convert_column_twice", "the header names column 'caption' more than once"),
])
def test_wrong_paths_are_one_line_errors(tmp_path, case, expected):
    (tmp_path / "empty").mkdir()
    (tmp_path / "not_a_shard.arrayrecord").write_bytes(SMALL)
    (tmp_path / "good.png").write_bytes(SMALL)
    write_jsonl(tmp_path / "l.jsonl", ["c"])
    (tmp_path / "a_file").write_text("x")
    convert_args = ["data", "convert", "--format", "jsonl"]
    argv = {
        "inspect_missing": ["data", "inspect", tmp_path / "missing"],
        "inspect_empty_folder": ["data", "inspect", tmp_path / "empty"],
        "inspect_not_a_shard": ["data", "inspect", tmp_path / "not_a_shard.arrayrecord"],
        "convert_missing_input": [*convert_args, tmp_path / "missing.jsonl", "--out", tmp_path / "out"],
        "convert_out_is_a_file": [*convert_args, tmp_path / "l.jsonl", "--out", tmp_path / "a_file"],
        "convert_folder_as_table": [*convert_args, tmp_path / "empty", "--out", tmp_path / "out"],
        "convert_column_twice": ["data", "convert", "--format", "csv", tmp_path / "twice.csv", "--out", tmp_path / "o"],
    }[case]
    (tmp_path / "twice.csv").write_text("image,caption,caption\ngood.png,the caption,another\n")
    line = error_line(run_cli(*argv))
    assert line.startswith(f"clip-jax data {argv[1]}: error: ") and expected in line, line
    if case.startswith("inspect"):
        assert "clip-jax data convert --out DIR" in line  # what to give instead


def test_an_input_named_twice_is_refused(tmp_path, capsys):
    """A folder and a tar of it, or a path and a glob: every sample was written twice, silently."""
    (tmp_path / "good.png").write_bytes(SMALL)
    write_jsonl(tmp_path / "a.jsonl", ["one"])
    out = tmp_path / "out"
    message = exit_message(["data", "convert", "--format", "jsonl", str(tmp_path / "a.jsonl"),
                            str(tmp_path / "*.jsonl"), "--out", str(out)], capsys)
    assert f"input {tmp_path / 'a.jsonl'} is named twice ({tmp_path / 'a.jsonl'} is the same file" in message, message
    assert not out.exists()


def test_a_set_whose_other_shards_came_from_elsewhere_is_refused(tmp_path, capsys):
    """Only the first shard of this machine's slice was compared with its report: a second machine's slice of other
    inputs was converted beside the first one's; and shards without reports (copied in) were written over."""
    (tmp_path / "good.png").write_bytes(SMALL)
    first, second, out = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "out"
    write_jsonl(first, ["one", "two", "three", "four"])
    (tmp_path / "other.png").write_bytes(SMALL)
    second.write_text("".join(json.dumps({"image": "other.png", "caption": c}) + "\n"
                              for c in ("five", "six", "seven", "eight")))
    convert.convert("jsonl", [str(first)], str(out), shard_size=2, shard_index=0, num_shards=2)
    message = exit_message(["data", "convert", "--format", "jsonl", str(second), "--shard-size", "2", "--out",
                            str(out), "--shard-index", "1", "--num-shards", "2"], capsys)
    assert f"its shard 0 was converted from {first}, and these inputs make it from {second}" in message, message
    assert not (out / "train-00001-of-00002.arrayrecord").exists()
    copied = tmp_path / "copied"
    copied.mkdir()
    (copied / "train-00000-of-00002.arrayrecord").write_bytes((out / "train-00000-of-00002.arrayrecord").read_bytes())
    message = exit_message(["data", "convert", "--format", "jsonl", str(second), "--shard-size", "2", "--out",
                            str(copied)], capsys)
    assert (f"--out {copied} holds train-00000-of-00002.arrayrecord without its report "
            "(reports/train-00000-of-00002.json), whose records are not of these inputs' rows") in message, message
    assert captions_of(copied / "train-00000-of-00002.arrayrecord") == ["one", "two"]


def test_a_slice_converted_from_an_older_input_is_not_done(tmp_path, capsys):
    """After an edit of the table, one machine's re-run redid its slice and said "2 of 2 shards done" over the other
    slice's shards of the old table: a set holding rows of both versions."""
    (tmp_path / "good.png").write_bytes(SMALL)
    table, out = tmp_path / "a.jsonl", tmp_path / "out"
    write_jsonl(table, ["one", "two", "three", "four"])
    convert.convert("jsonl", [str(table)], str(out), shard_size=2)
    write_jsonl(table, ["one", "three", "four", "five"])
    capsys.readouterr()
    cli.main(["data", "convert", "--format", "jsonl", str(table), "--shard-size", "2", "--out", str(out),
              "--shard-index", "1", "--num-shards", "2"])
    captured = capsys.readouterr()
    assert f"{out}: 1 of 2 shards done" in captured.out, captured.out
    assert (f"1 shards of {out} (train-00000-of-00002.arrayrecord) were converted from another version of their "
            "input") in captured.err, captured.err
    summary = json.loads((out / "reports" / "train-summary.json").read_text())
    assert summary["stale"] == ["train-00000-of-00002.arrayrecord"] and summary["shards_done"] == 1
    cli.main(["data", "convert", "--format", "jsonl", str(table), "--shard-size", "2", "--out", str(out)])
    captured = capsys.readouterr()
    assert f"{out}: 2 of 2 shards done" in captured.out and "another version" not in captured.err
    assert captions_of(out / "train-00000-of-00002.arrayrecord") == ["one", "three"]


def test_a_short_caption_field_that_no_row_has_is_refused(tmp_path, capsys):
    """A misspelt --short-caption-field was ignored: the records had no short captions, and the column went to the
    metadata."""
    (tmp_path / "good.png").write_bytes(SMALL)
    (tmp_path / "t.csv").write_text("image,caption,summary\ngood.png,a long caption,short\n")
    out = tmp_path / "out"
    message = exit_message(["data", "convert", "--format", "csv", str(tmp_path / "t.csv"), "--short-caption-field",
                            "sumary", "--out", str(out)], capsys)
    assert "t.csv: no row has a short caption under 'sumary' (--short-caption-field)" in message, message
    assert not out.exists()
    cli.main(["data", "convert", "--format", "csv", str(tmp_path / "t.csv"), "--short-caption-field", "summary",
              "--out", str(out)])
    record = records.decode_record(grain.sources.ArrayRecordDataSource([str(next(out.glob("*.arrayrecord")))])[0])
    assert record["short_caption"] == "short"


def test_leftovers_of_a_killed_conversion_on_this_host_are_removed(tmp_path):
    """A conversion killed at once leaves its temporary shard (NAME.tmp-HOST-PID); the next run on the host removes
    those of processes that no longer run, and leaves another host's, which may be writing them."""
    import socket

    (tmp_path / "good.png").write_bytes(SMALL)
    write_jsonl(tmp_path / "a.jsonl", ["one"])
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f"train-00000-of-00001.arrayrecord.tmp-{socket.gethostname()}-{int(dead.stdout)}"
    others = [out / "train-00000-of-00001.arrayrecord.tmp-another-host-1",
              out / f"other-00000-of-00001.arrayrecord.tmp-{socket.gethostname()}-{os.getpid()}"]  # running
    for path in (stale, *others):
        path.write_bytes(b"partial")
    with pytest.raises(FileNotFoundError, match=r"no \.arrayrecord shards in .*: 3 unfinished \(\.tmp-\): is a "):
        records.list_shards(str(out))
    convert.convert("jsonl", [str(tmp_path / "a.jsonl")], str(out))
    assert not stale.exists() and all(p.exists() for p in others)


def test_an_interrupted_conversion_stops_its_workers(tmp_path):
    """After a Ctrl-C or SIGTERM with --workers 2, the workers went on converting, then waited forever: the
    command said "interrupted" and left them running."""
    slow = png(np.random.default_rng(1).integers(0, 256, (1500, 1500, 3), np.uint8))  # ~0.1 s to check each
    (tmp_path / "slow.png").write_bytes(slow)
    (tmp_path / "t.csv").write_text("image,caption\n" + "".join(f"slow.png,caption {i}\n" for i in range(400)))
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", CLI, "data", "convert", "--format", "csv",
                                str(tmp_path / "t.csv"), "--out", str(out), "--shard-size", "2", "--workers", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children = pathlib.Path(f"/proc/{process.pid}/task/{process.pid}/children")
    with deadline(TIMEOUT):
        while len(list(out.glob("reports/train-*-of-*.json"))) < 2:  # the workers are converting
            assert process.poll() is None, process.communicate()
            time.sleep(0.2)
        workers = [int(pid) for pid in children.read_text().split()]
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate()
        while any(pathlib.Path(f"/proc/{pid}").exists() for pid in workers):  # the deadline says if they stay
            time.sleep(0.2)
    assert process.returncode == 130 and stderr.strip().endswith("clip-jax data convert: interrupted"), stderr
    assert len(workers) >= 2  # (the spawned workers and multiprocessing's resource tracker)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert len(list(out.glob("*.arrayrecord"))) == len(list(out.glob("reports/train-*-of-*.json")))


def test_a_record_whose_caption_is_white_space_is_dropped(caplog):
    """Shards of another writer than `data convert` (which cleans captions) may hold one: it was trained on."""
    decode = DecodeExample(16, 16)
    assert decode.map({"long_caption": " \n\t", "image_bytes": SMALL, "key": "k1"}) is None
    assert "dropping example k1: empty caption" in caplog.text
    assert decode.map({"long_caption": " a caption ", "image_bytes": SMALL, "key": "k2"}) is not None


def test_an_example_dropped_again_is_not_named_again(caplog):
    """A small table's empty caption was named at every epoch (8 lines in 20 steps); the count goes on."""
    decode = DecodeExample(16, 16)
    for _ in range(3):
        assert decode.map({"long_caption": "", "image_bytes": SMALL, "key": "k1"}) is None
    assert decode.map({"long_caption": "", "image_bytes": SMALL, "key": "k2"}) is None
    assert caplog.text.count("dropping example k1") == 1 and "dropping example k2: empty caption (4 dropped" in \
        caplog.text


def test_a_caption_that_is_not_text_is_dropped_as_such(tmp_path, caplog):
    """A JSONL caption that is a number or a list was dropped as an "empty caption"."""
    from clip_jax.data.captions import CaptionFileSource, read_table

    (tmp_path / "t.jsonl").write_text('{"image": "a.png", "caption": 12345}\n{"image": "b.png", "caption": ["x"]}\n')
    source = CaptionFileSource(read_table(str(tmp_path / "t.jsonl"), "jsonl"), "t.jsonl")
    assert [source[i]["error"] for i in range(2)] == ["its caption is an int, not text",
                                                      "its caption is a list, not text"]


def test_a_tars_metadata_with_bytes_that_are_not_utf8_and_a_key_written_twice(tmp_path):
    """A .json with one byte that is not UTF-8 lost all its keys, and its caption counted as missing_caption; a
    key's files written twice in a row kept the second pair only, with no count."""
    from tests.test_convert import make_tar

    make_tar(tmp_path / "00000.tar", [
        ("a.png", SMALL), ("a.txt", b"a caption"), ("a.json", b'{"url": "http://x/caf\xe9", "w": 64}'),
        ("b.png", SMALL), ("b.json", b'{"caption": "caf\xe9 from the json"}'),
        ("c.png", SMALL), ("c.txt", b"first c"), ("c.png", SMALL), ("c.txt", b"second c"),
    ])
    out = tmp_path / "out"
    summary = convert.convert("webdataset", [str(tmp_path / "00000.tar")], str(out), min_size=1)
    assert summary["skipped"] == {"non_utf8_caption": 1} and summary["metadata_dropped"] == 0
    recs = [records.decode_record(r) for r in grain.sources.ArrayRecordDataSource(
        [str(out / "train-00000-of-00001.arrayrecord")])]
    assert [(r["key"], r["caption"]) for r in recs] == [("a", "a caption"), ("c", "first c"), ("c", "second c")]
    assert records.record_metadata(recs[0]) == {"url": "http://x/caf\udce9", "w": 64}  # the byte as an escape


def test_a_folder_linked_into_itself_is_read_once(tmp_path):
    """A link to a folder above (or to itself) walked for ever, or gave every image many times over; a linked folder
    of images is read, once."""
    import os

    from clip_jax.data.images import image_files

    (tmp_path / "set" / "cats").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "b.jpg").write_bytes(b"")
    (tmp_path / "set" / "cats" / "a.jpg").write_bytes(b"")
    os.symlink("..", tmp_path / "set" / "cats" / "up")
    os.symlink(".", tmp_path / "set" / "here")
    os.symlink(tmp_path / "elsewhere", tmp_path / "set" / "linked")
    assert [p.relative_to(tmp_path / "set").as_posix() for p in image_files(tmp_path / "set")] == [
        "cats/a.jpg", "linked/b.jpg"]
