"""`clip-jax data convert --runner`: the Beam pipeline (on Beam's in-process runner) writes the records the local
converter writes, byte for byte, counts bad samples in Beam metrics as the reports do, skips finished shards on a
re-run, and says what to install when Beam is missing."""

import json
import re
import sys

import pytest

import clip_jax.data
from clip_jax import cli
from clip_jax.data import beam_convert, convert, records

from .test_convert import GOOD_JPEG, image_bytes, make_tar, write_images

# The in-process runner the DirectRunner runs batch pipelines on when it does not take Prism, a Go binary it downloads
# from GitHub on first use: pinned, as Beam advises for tests (apache/beam#34612), so that the tests run in this
# process and offline.
RUNNER = "FnApiRunner"
BEAM = ["--direct_num_workers=1"]  # one worker thread: the test's cores are shared


def csv_input(root):
    """A table of 9 rows (5 good; a missing file, an empty caption, a non-UTF-8 caption, an image too small) and
    its images; with shard_size 2: 5 shards."""
    write_images(root / "imgs", ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"])
    (root / "imgs" / "small.png").write_bytes(image_bytes(8, 8, fmt="PNG"))
    (root / "imgs" / "cmyk.jpg").write_bytes(image_bytes(mode="CMYK", smooth=True))  # re-encoded
    (root / "list.csv").write_bytes(
        b"image,caption,short_caption,source\n"
        b"a.jpg,\"caption a, quoted\",short a,web\n"
        b"missing.jpg,caption,,\n"
        b"b.jpg,,,\n"
        b"c.jpg,caf\xe9 not utf-8,,\n"
        b"small.png,too small,,\n"
        b"d.jpg,caption d,,\n"
        b"cmyk.jpg,caption cmyk,,\n"
        b"e.jpg,caption e,,\n"
        b"f.jpg,caption f,,\n"
    )
    return "csv", [str(root / "list.csv")], {"image_root": str(root / "imgs"), "shard_size": 2}


def tar_input(root):
    """Two tars (8 samples; a truncated image, an undecodable one, one without caption, one without image)."""
    make_tar(root / "00000.tar", [
        ("000.jpg", GOOD_JPEG), ("000.txt", b"caption 0"), ("000.json", b'{"url": "http://a"}'),
        ("001.jpg", GOOD_JPEG[: len(GOOD_JPEG) // 2]), ("001.txt", b"truncated"),
        ("002.png", image_bytes(fmt="PNG")), ("002.txt", b"caption 2"),
        ("003.jpg", b"not an image"), ("003.txt", b"garbage"),
    ])
    make_tar(root / "00001.tar", [
        ("100.jpg", GOOD_JPEG),
        ("101.txt", b"no image"),
        ("102.webp", image_bytes(fmt="WEBP")), ("102.txt", b"caption 102"),
        ("103.jpg", GOOD_JPEG), ("103.txt", b"caption 103"),
    ])
    return "webdataset", [str(root / "00000.tar"), str(root / "00001.tar")], {}


def shard_records(out):
    """{shard name: its records' bytes, in order}."""
    shards = {}
    for path in sorted(out.glob(f"*{records.SUFFIX}")):
        source = records.open_shards([str(path)])
        shards[path.name] = [source[i] for i in range(len(source))]
    return shards


def stable(obj):
    """`obj` without what differs between two conversions of the same input: the timing fields of reports and the
    addresses in PIL's messages (`<_io.BytesIO object at 0x7f...>`) of the bad-sample examples."""
    text = re.sub(r" at 0x[0-9a-f]+", "", json.dumps(obj))
    return json.loads(re.sub(r'"(seconds|finished|host)": [^,}]*', r'"\1": null', text))


def reports(out):
    return {p.name: stable(json.loads(p.read_text())) for p in sorted((out / "reports").glob("train-0*.json"))}


def beam(fmt, inputs, out, kwargs):
    return beam_convert.convert(fmt, inputs, str(out), runner=RUNNER, pipeline_options=BEAM, **kwargs)


@pytest.mark.parametrize("make_input", [csv_input, tar_input], ids=["csv", "webdataset"])
def test_the_pipeline_writes_the_local_converters_records(tmp_path, make_input):
    fmt, inputs, kwargs = make_input(tmp_path)
    local = convert.convert(fmt, inputs, str(tmp_path / "local"), **kwargs)
    summary = beam(fmt, inputs, tmp_path / "beam", kwargs)

    expected = shard_records(tmp_path / "local")
    assert len(expected) == summary["shards"] > 1 and sum(map(len, expected.values())) == local["written"] > 0
    assert shard_records(tmp_path / "beam") == expected
    assert reports(tmp_path / "beam") == reports(tmp_path / "local")
    on_disk = json.loads((tmp_path / "beam" / "reports" / "train-summary.json").read_text())
    assert on_disk == json.loads((tmp_path / "local" / "reports" / "train-summary.json").read_text())
    assert stable(summary | {"counters": None}) == stable(local | {"counters": None})

    counters = summary["counters"]
    bad = {k.removeprefix(beam_convert.SKIPPED): v for k, v in counters.items() if k.startswith(beam_convert.SKIPPED)}
    assert len(bad) >= 4 and bad == local["skipped"]  # the reports' counts, summed over shards
    assert counters["shards_converted"] == local["shards"] and "shards_resumed" not in counters
    assert (counters["samples_read"], counters["samples_written"], counters["samples_skipped"]) == (
        local["samples"], local["written"], sum(bad.values()))
    assert [p.name for p in (tmp_path / "beam").iterdir() if p.name.startswith(".")] == []  # staged rows removed


def test_a_rerun_skips_finished_shards_and_redoes_the_others(tmp_path):
    fmt, inputs, kwargs = csv_input(tmp_path)
    out = tmp_path / "out"
    first = beam(fmt, inputs, out, kwargs)
    written = shard_records(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}

    again = beam(fmt, inputs, out, kwargs)
    assert again["counters"] == {"shards_resumed": first["shards"]}
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == mtimes
    assert again | {"counters": None} == first | {"counters": None}

    (out / "reports" / "train-00003-of-00005.json").unlink()  # as if its worker died before the report
    third = beam(fmt, inputs, out, kwargs)
    assert third["counters"]["shards_converted"] == 1 and third["counters"]["shards_resumed"] == first["shards"] - 1
    assert shard_records(out) == written and third["written"] == first["written"]
    changed = [name for name, t in mtimes.items() if (out / name).stat().st_mtime_ns != t]
    assert changed == ["train-00003-of-00005.arrayrecord"]

    # A DirectRunner conversion killed at once left its shard's temporary file and its staged rows: a re-run kept
    # them for ever. Those of a process that runs no more, on this host, go.
    import socket
    import subprocess

    ended = subprocess.Popen(["true"])
    ended.wait()
    host = socket.gethostname()
    left = [out / f"train-00001-of-00005.arrayrecord.tmp-{host}-{ended.pid}",
            out / f".train-rows-{host}-{ended.pid}.json"]
    for path in left:
        path.write_bytes(b"partial")
    beam(fmt, inputs, out, kwargs)
    assert not any(path.exists() for path in left)


def test_a_failed_shard_is_listed_and_the_others_finish(tmp_path):
    fmt, inputs, kwargs = tar_input(tmp_path)
    blocker = tmp_path / "out" / "train-00001-of-00002.arrayrecord"
    (blocker / "x").mkdir(parents=True)  # a folder where the shard goes: its rename fails
    summary = beam(fmt, inputs, tmp_path / "out", kwargs)
    assert [f["shard"] for f in summary["failed"]] == [blocker.name] and summary["shards_done"] == 1
    assert summary["counters"]["shards_failed"] == 1 and summary["counters"]["shards_converted"] == 1


def test_cli_runner(tmp_path, capsys):
    fmt, inputs, _ = csv_input(tmp_path)
    command = ["data", "convert", "--format", fmt, *inputs, "--out", str(tmp_path / "out"), "--image-root",
               str(tmp_path / "imgs"), "--shard-size", "2"]
    cli.main([*command, "--runner", RUNNER, "--", *BEAM])
    printed = capsys.readouterr().out
    assert ("Beam counters of this run: samples_read 9, samples_skipped 4, samples_written 5, shards_converted 5; bad "
            "samples by reason: empty_caption 1, missing_file 1, non_utf8_caption 1, too_small 1") in printed
    assert "5 of 5 shards done, 5 of 9 samples written (skipped: empty_caption 1, missing_file 1, " in printed
    cli.main([*command, "--runner", RUNNER, "--", *BEAM])
    assert "Beam counters of this run: shards_resumed 5; bad samples by reason: none" in capsys.readouterr().out

    for extra, message in [
        (["--runner", RUNNER, "--workers", "2", "--num-shards", "2"],
         "clip-jax data convert: error: --workers, --num-shards do not combine with --runner: Beam spreads the shards"),
        (["--runner", RUNNER, "--", "--runner=DataflowRunner"],
         "clip-jax data convert: error: give the runner as --runner, not as a pipeline option"),
        (["--", "--project=p"], "arguments after -- are Apache Beam pipeline options: only data convert --runner"),
        (["--runner", "NoSuchRunner"],
         "clip-jax data convert: error: Unexpected pipeline runner: NoSuchRunner. Valid values"),
    ]:
        with pytest.raises(SystemExit) as exc:
            cli.main([*command, *extra])
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_without_beam_runner_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # `import apache_beam` raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "clip_jax.data.beam_convert")
    monkeypatch.delattr(clip_jax.data, "beam_convert")
    fmt, inputs, _ = csv_input(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(["data", "convert", "--format", fmt, *inputs, "--out", str(tmp_path / "out"), "--runner", "X"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.strip().splitlines() == [
        'clip-jax data convert: error: --runner needs Apache Beam, which is not installed: install the [beam] extra '
        '(pip install -e ".[beam]")']
