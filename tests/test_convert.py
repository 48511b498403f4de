"""`clip-jax data convert`: every input format becomes shards whose records are the good samples in input order
(original image bytes kept, CMYK/16-bit re-encoded), bad samples are skipped and counted by reason, shards are
numbered over the inputs so machines can split the work, and a re-run converts only unfinished shards."""

import io
import json
import os
import tarfile
import warnings

import grain
import numpy as np
import pytest
from PIL import Image

from clip_jax import cli
from clip_jax.data import convert, records
from clip_jax.data.pipeline import train_dataset
from clip_jax.data.tokenizer import ClipTokenizer

RNG = np.random.default_rng(0)


def image_bytes(w=48, h=40, fmt="JPEG", mode="RGB", value=None, smooth=False):
    if smooth:  # a colour gradient: survives JPEG re-encoding closely, as photos do (noise would not)
        y, x = np.mgrid[0:h, 0:w]
        array = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h) + 64], -1).astype(np.uint8)
    else:
        array = RNG.integers(0, 256, (h, w, 3), np.uint8) if value is None else np.full((h, w, 3), value, np.uint8)
    out = io.BytesIO()
    Image.fromarray(array).convert(mode).save(out, fmt)
    return out.getvalue()


def sixteen_bit_png():
    out = io.BytesIO()
    Image.fromarray(np.full((40, 40), 1000, np.uint16)).save(out, "PNG")
    return out.getvalue()


def read_shards(paths):
    return [records.decode_record(r) for r in grain.sources.ArrayRecordDataSource([str(p) for p in paths])]


def make_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


LONG = " ".join(["word"] * 2000)
GOOD_JPEG = image_bytes()


def test_webdataset_tar(tmp_path):
    png, webp, deep = image_bytes(fmt="PNG"), image_bytes(fmt="WEBP"), sixteen_bit_png()
    cmyk = image_bytes(mode="CMYK", smooth=True)
    make_tar(tmp_path / "00000.tar", [
        ("000.jpg", GOOD_JPEG), ("000.txt", b"a  photo\nof a cat "), ("000.json", b'{"url": "http://a", "w": 48}'),
        ("001.png", png), ("001.txt", LONG.encode()),
        ("002.webp", webp), ("002.json", b'{"caption": "from the json"}'),
        ("003.jpg", GOOD_JPEG[: len(GOOD_JPEG) // 2]), ("003.txt", b"truncated"),
        ("004.jpg", b"not an image"), ("004.txt", b"garbage"),
        ("005.jpg", image_bytes(8, 100)), ("005.txt", b"tiny"),
        ("006.jpg", GOOD_JPEG), ("006.txt", b" \n "),
        ("007.jpg", GOOD_JPEG), ("007.txt", b"caf\xe9 latin-1"),
        ("008.txt", b"no image"),
        ("009.jpg", GOOD_JPEG),
        ("010.jpg", cmyk), ("010.txt", b"cmyk"), ("010.json", b"{not json"),
        ("011.png", deep), ("011.txt", b"sixteen bit"),
    ])
    summary = convert.convert("webdataset", [str(tmp_path)], str(tmp_path / "out"))
    assert (tmp_path / "out" / "train-00000-of-00001.arrayrecord").exists()
    report = json.loads((tmp_path / "out" / "reports" / "train-00000-of-00001.json").read_text())
    assert report["skipped"] == {"empty_caption": 1, "missing_caption": 1, "missing_image": 1, "non_utf8_caption": 1,
                                 "too_small": 1, "truncated_image": 1, "undecodable_image": 1}
    assert report["samples"] == 12 and report["written"] == 5 and report["metadata_dropped"] == 1
    assert report["reencoded"] == {"JPEG/CMYK": 1, "PNG/I;16": 1}
    assert report["examples"]["too_small"] == ["005: 8x100"]
    assert summary["written"] == 5 and summary["skipped"] == report["skipped"] and summary["shards_done"] == 1
    recs = read_shards([tmp_path / "out" / "train-00000-of-00001.arrayrecord"])
    assert [r["key"] for r in recs] == ["000", "001", "002", "010", "011"]
    assert [r["image"] for r in recs[:3]] == [GOOD_JPEG, png, webp]  # the original bytes, byte for byte
    assert recs[0]["caption"] == "a photo of a cat" and records.record_metadata(recs[0]) == {"url": "http://a", "w": 48}
    assert recs[1]["caption"] == LONG  # never truncated
    assert recs[2]["caption"] == "from the json"
    assert "metadata" not in recs[3]
    cmyk_back = Image.open(io.BytesIO(recs[3]["image"]))
    assert (cmyk_back.format, cmyk_back.mode) == ("JPEG", "RGB")
    original = np.asarray(Image.open(io.BytesIO(cmyk)).convert("RGB"), np.float32)
    assert np.abs(np.asarray(cmyk_back, np.float32) - original).mean() < 3
    deep_back = Image.open(io.BytesIO(recs[4]["image"]))
    assert (deep_back.format, deep_back.mode) == ("PNG", "RGB")
    assert (np.asarray(deep_back) == 255).all()  # scaled by the maximum, not clipped


def test_truncated_tar_keeps_the_samples_before(tmp_path):
    make_tar(tmp_path / "full.tar", [(f"{i:03d}.{ext}", GOOD_JPEG if ext == "jpg" else f"caption {i}".encode())
                                     for i in range(4) for ext in ("jpg", "txt")])
    data = (tmp_path / "full.tar").read_bytes()
    with tarfile.open(tmp_path / "full.tar") as tar:
        cut = tar.getmember("002.jpg").offset_data + 100  # inside sample 002's image
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    summary = convert.convert("webdataset", [str(tmp_path / "cut.tar")], str(tmp_path / "out"))
    assert summary["written"] == 2 and summary["skipped"] == {"truncated_tar": 1}
    assert [r["caption"] for r in read_shards([tmp_path / "out" / "train-00000-of-00001.arrayrecord"])] == [
        "caption 0", "caption 1"]
    # Cut between two members, at a header or inside one: tarfile reads such a file as ended, without an error. Sample
    # 001, read whole but maybe not all of its files, is the one counted; before the fix no cut was counted at all.
    with tarfile.open(tmp_path / "full.tar") as tar:
        header = tar.getmember("002.jpg").offset
    for name, end in (("at_header", header), ("in_header", header + 100)):
        (tmp_path / f"{name}.tar").write_bytes(data[:end])
        summary = convert.convert("webdataset", [str(tmp_path / f"{name}.tar")], str(tmp_path / name))
        assert summary["written"] == 1 and summary["skipped"] == {"truncated_tar": 1}, name
        report = json.loads((tmp_path / name / "reports" / "train-00000-of-00001.json").read_text())
        assert report["examples"]["truncated_tar"] == ["001: ReadError: the tar ends without its end-of-archive "
                                                       "blocks"], name
    # The whole tar, end blocks and all, has nothing cut.
    summary = convert.convert("webdataset", [str(tmp_path / "full.tar")], str(tmp_path / "whole"))
    assert summary["written"] == 4 and summary["skipped"] == {}
    # A file that is no tar at all (a table given as --format webdataset) is not called a cut tar.
    (tmp_path / "table.tar").write_text('{"image": "a.jpg", "caption": "a red circle"}\n' * 20)
    summary = convert.convert("webdataset", [str(tmp_path / "table.tar")], str(tmp_path / "out2"))
    assert summary["written"] == 0 and summary["skipped"] == {"unreadable_tar": 1}


def test_a_read_error_of_the_storage_leaves_the_shard_unfinished(tmp_path, monkeypatch):
    """EIO (a failing disk, a bucket's reset connection) mid-tar is not a cut tar: counted as one, the shard was marked
    complete with the samples before it, and a re-run kept it."""
    import errno

    from etils import epath

    make_tar(tmp_path / "a.tar", [(f"{i:03d}.{ext}", GOOD_JPEG if ext == "jpg" else f"caption {i}".encode())
                                  for i in range(4) for ext in ("jpg", "txt")])
    local_path = type(epath.Path(tmp_path))  # epath.Path() gives a subclass per backend
    real_open = local_path.open

    class Failing(io.RawIOBase):
        def __init__(self, f):
            self.f = f

        def readable(self):
            return True

        def readinto(self, buffer):
            if self.f.tell() > 3000:  # after the first sample
                raise OSError(errno.EIO, "Input/output error")
            return self.f.readinto(memoryview(buffer)[:512])

    def flaky_open(self, mode="r", *args, **kwargs):
        f = real_open(self, mode, *args, **kwargs)
        return io.BufferedReader(Failing(f)) if self.name == "a.tar" else f

    monkeypatch.setattr(local_path, "open", flaky_open)
    summary = convert.convert("webdataset", [str(tmp_path / "a.tar")], str(tmp_path / "out"))
    assert summary["shards_done"] == 0 and len(summary["failed"]) == 1
    assert "cannot read" in summary["failed"][0]["error"] and "re-run the command" in summary["failed"][0]["error"]
    assert not list((tmp_path / "out").glob("*.arrayrecord"))
    monkeypatch.undo()
    summary = convert.convert("webdataset", [str(tmp_path / "a.tar")], str(tmp_path / "out"))
    assert summary["shards_done"] == 1 and summary["written"] == 4 and not summary["failed"]


def write_images(root, names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(image_bytes(value=len(name)))


def test_csv_chunks_into_shards(tmp_path):
    write_images(tmp_path / "imgs", ["a.jpg", "b.jpg", "sub/c.jpg", "d.jpg", "e.jpg"])
    (tmp_path / "list.csv").write_bytes(
        b"image,caption,short_caption,source\n"
        b"a.jpg,\"long, quoted caption. second sentence\",short a,web\n"
        b"missing.jpg,caption,,\n"
        b"b.jpg,,,\n"
        b"sub/c.jpg,caf\xe9 not utf-8,,\n"
        b"d.jpg,caption d,,\n"
        b",no image,,\n"
        b"e.jpg,caption e,,\n"
    )
    summary = convert.convert("csv", [str(tmp_path / "list.csv")], str(tmp_path / "out"),
                              image_root=str(tmp_path / "imgs"), shard_size=3)
    names = sorted(p.name for p in (tmp_path / "out").glob("*.arrayrecord"))
    assert names == [f"train-0000{i}-of-00003.arrayrecord" for i in range(3)]
    assert summary["skipped"] == {"bad_row": 1, "empty_caption": 1, "missing_file": 1, "non_utf8_caption": 1}
    first = json.loads((tmp_path / "out" / "reports" / "train-00000-of-00003.json").read_text())
    assert first["examples"]["missing_file"] == [f"missing.jpg: {tmp_path / 'imgs' / 'missing.jpg'}"]
    stats = convert.ShardStats()  # a path that is the key as written is said once
    stats.skip("missing_file", "img/x.png", "img/x.png")
    assert stats.examples == {"missing_file": ["img/x.png"]}
    recs = read_shards(sorted((tmp_path / "out").glob("*.arrayrecord")))
    assert [r["key"] for r in recs] == ["a.jpg", "d.jpg", "e.jpg"]
    assert recs[0]["caption"] == "long, quoted caption. second sentence" and recs[0]["short_caption"] == "short a"
    assert records.record_metadata(recs[0]) == {"source": "web"} and "short_caption" not in recs[1]
    assert recs[1]["image"] == (tmp_path / "imgs" / "d.jpg").read_bytes()
    reports = [json.loads(p.read_text()) for p in sorted((tmp_path / "out" / "reports").glob("train-0*.json"))]
    assert [(r["samples"], r["written"]) for r in reports] == [(3, 1), (3, 1), (1, 1)]


def test_tsv_and_jsonl(tmp_path):
    write_images(tmp_path, ["x.png", "y.png"])
    (tmp_path / "t.tsv").write_text('image\tcaption\nx.png\ta "quoted" caption\ny.png\tsecond\n', encoding="utf-8")
    (tmp_path / "t.jsonl").write_text(
        '{"image": "x.png", "caption": "j1", "short_caption": "s1", "id": 7, "note": "caf\\udce9"}\n{broken json\n\n'
        '{"image": "y.png", "caption": "\\udc80 lone surrogate"}\n{"image": "y.png", "caption": "j2"}\n')
    convert.convert("tsv", [str(tmp_path / "t.tsv")], str(tmp_path / "tsv"))
    assert [r["caption"] for r in read_shards((tmp_path / "tsv").glob("*.arrayrecord"))] == ['a "quoted" caption',
                                                                                             "second"]
    summary = convert.convert("jsonl", [str(tmp_path / "t.jsonl")], str(tmp_path / "jsonl"))
    assert summary["skipped"] == {"bad_row": 1, "non_utf8_caption": 1}
    recs = read_shards((tmp_path / "jsonl").glob("*.arrayrecord"))
    assert [(r["caption"], r.get("short_caption")) for r in recs] == [("j1", "s1"), ("j2", None)]
    # metadata holding what is not UTF-8 (a JSON escape here; a table's stray byte alike) is kept as it was
    assert records.record_metadata(recs[0]) == {"id": 7, "note": "caf\udce9"}


def test_sharegpt4v(tmp_path):
    write_images(tmp_path / "data" / "coco", ["1.jpg", "2.jpg"])
    entries = [
        {"id": "a", "image": "coco/1.jpg", "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                             {"from": "gpt", "value": "A long\n\ncaption. More."}]},
        {"id": "b", "image": "coco/2.jpg", "conversations": [{"from": "human", "value": "?"}]},
        {"id": "c", "conversations": []},
    ]
    (tmp_path / "sharegpt4v.json").write_text(json.dumps(entries))
    summary = convert.convert("sharegpt4v", [str(tmp_path / "sharegpt4v.json")], str(tmp_path / "out"),
                              image_root=str(tmp_path / "data"))
    assert summary["skipped"] == {"bad_row": 1, "missing_caption": 1}
    (rec,) = read_shards((tmp_path / "out").glob("*.arrayrecord"))
    assert rec["caption"] == "A long caption. More." and records.record_metadata(rec) == {"id": "a"}


def test_folder_layouts(tmp_path):
    write_images(tmp_path / "f1", ["a.jpg", "sub/b.png", "c.webp"])
    (tmp_path / "f1" / "captions.json").write_text(json.dumps(  # A.JPG: a caption of no image, not silently lost
        {"a.jpg": "caption a", "sub/b.png": {"caption": "long b", "short_caption": "b"}, "A.JPG": "miscased"}))
    write_images(tmp_path / "f2", ["p.jpg", "q.jpg"])
    (tmp_path / "f2" / "p.txt").write_text("sidecar p\n")
    # hidden entries are no examples (they were a missing caption each): a notebook's copy, macOS's ._p.jpg
    write_images(tmp_path / "f2", [".ipynb_checkpoints/p-checkpoint.jpg", "._p.jpg"])
    summary = convert.convert("folder", [str(tmp_path / "f1"), str(tmp_path / "f2")], str(tmp_path / "out"),
                              shard_size=2)
    assert summary["shards"] == 3 and summary["skipped"] == {"missing_caption": 2, "missing_file": 1}
    report = json.loads((tmp_path / "out" / "reports" / "train-00001-of-00003.json").read_text())
    assert report["examples"]["missing_file"][0].startswith("A.JPG")
    recs = read_shards(sorted((tmp_path / "out").glob("*.arrayrecord")))
    assert [(r["key"], r["caption"], r.get("short_caption")) for r in recs] == [
        ("a.jpg", "caption a", None), ("sub/b.png", "long b", "b"), ("p.jpg", "sidecar p", None)]


def test_machines_split_the_shards_and_reruns_skip_finished_ones(tmp_path):
    tars = []
    for t in range(3):
        tars.append(tmp_path / f"{t:05d}.tar")
        make_tar(tars[-1], [(f"{t}{i}.{ext}", GOOD_JPEG if ext == "jpg" else b"c") for i in range(2)
                            for ext in ("jpg", "txt")])
    out = tmp_path / "out"
    first = convert.convert("webdataset", [str(p) for p in tars], str(out), shard_index=1, num_shards=2)
    assert sorted(p.name for p in out.glob("*.arrayrecord")) == ["train-00001-of-00003.arrayrecord"]
    assert first["shards_done"] == 1 and len(first["missing"]) == 2
    second = convert.convert("webdataset", [str(p) for p in tars], str(out), shard_index=0, num_shards=2)
    assert second["shards_done"] == 3 and second["written"] == 6 and second["missing"] == []
    shard1 = out / "train-00001-of-00003.arrayrecord"
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.arrayrecord")}
    (out / "reports" / "train-00002-of-00003.json").unlink()  # as if the machine died before finishing shard 2
    seen = []
    again = convert.convert("webdataset", [str(p) for p in tars], str(out), progress=seen.append)
    assert sorted((r["shard"][6:11], bool(r.get("resumed"))) for r in seen) == [
        ("00000", True), ("00001", True), ("00002", False)]
    assert shard1.stat().st_mtime_ns == mtimes[shard1.name] and again["written"] == 6
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    # A shard deleted by hand, its report left: it was "converted before, skipped" for ever, and the summary said
    # 3 of 3 done with 2 shards on disk
    shard1.unlink()
    summary = convert.summarize(str(out), "train", 3)
    assert summary["shards_done"] == 2 and summary["missing"] == [shard1.name]
    seen.clear()
    again = convert.convert("webdataset", [str(p) for p in tars], str(out), progress=seen.append)
    assert [r.get("redone") for r in seen if r["shard"] == shard1.name] == ["its shard file is gone (its report "
                                                                            "remains)"]
    assert shard1.exists() and again["shards_done"] == 3 and again["written"] == 6


def test_a_workers_stop_swallowed_in_a_gc_callback_still_stops_its_shard(tmp_path, monkeypatch):
    """A worker's SIGTERM raised its SystemExit inside jax's gc callback, where Python prints and ignores it: the
    worker went on and finished its shards after the command had said "interrupted". The stop is kept and raised
    again between samples; the shard's temporary file goes."""
    write_images(tmp_path, [f"{i}.jpg" for i in range(4)])
    (tmp_path / "l.jsonl").write_text("".join(json.dumps({"image": f"{i}.jpg", "caption": f"c{i}"}) + "\n"
                                              for i in range(4)))
    tasks, opts = convert.prepare("jsonl", [str(tmp_path / "l.jsonl")], str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(convert, "_stop_code", 143)
    with pytest.raises(SystemExit) as stop:
        convert.convert_shard(tasks[0], opts)
    assert stop.value.code == 143 and not list((tmp_path / "out").rglob("*"))


def test_parallel_workers_write_the_same_shards(tmp_path):
    write_images(tmp_path, [f"{i}.jpg" for i in range(6)])
    (tmp_path / "l.jsonl").write_text("".join(json.dumps({"image": f"{i}.jpg", "caption": f"c{i}"}) + "\n"
                                              for i in range(6)))
    convert.convert("jsonl", [str(tmp_path / "l.jsonl")], str(tmp_path / "one"), shard_size=2)
    convert.convert("jsonl", [str(tmp_path / "l.jsonl")], str(tmp_path / "two"), shard_size=2, workers=2)
    for name in (f"train-0000{i}-of-00003.arrayrecord" for i in range(3)):
        assert read_shards([tmp_path / "one" / name]) == read_shards([tmp_path / "two" / name])


def test_inspect_cuts_long_captions(tmp_path, capsys):
    write_images(tmp_path, ["0.png"])
    caption = "x" * 2000
    (tmp_path / "l.jsonl").write_text(json.dumps({"image": "0.png", "caption": caption}) + "\n")
    convert.convert("jsonl", [str(tmp_path / "l.jsonl")], str(tmp_path / "out"))
    cli.main(["data", "inspect", str(tmp_path / "out")])
    shown = json.loads(capsys.readouterr().out)["samples"][0]["caption"]
    assert shown == caption[:500] + "... (2,000 characters in all)"


def test_cli_convert_inspect_and_train_on_the_result(tmp_path, capsys):
    write_images(tmp_path, [f"{i}.png" for i in range(8)])
    (tmp_path / "l.csv").write_text("file,text\n" + "".join(f"{i}.png,caption {i}\n" for i in range(8)) +
                                    "gone.png,a caption of no image\n")
    cli.main(["data", "convert", "--format", "csv", str(tmp_path / "l.csv"), "--out", str(tmp_path / "out"),
              "--image-field", "file", "--caption-field", "text", "--shard-size", "3", "--prefix", "web"])
    printed = capsys.readouterr().out
    assert "web-00002-of-00003.arrayrecord: 2 of 3 samples written" in printed
    assert "3 of 3 shards done, 8 of 9 samples written (skipped: missing_file 1)" in printed
    cli.main(["data", "inspect", str(tmp_path / "out"), "-n", "2"])
    info = json.loads(capsys.readouterr().out)
    assert info["shards"] == 3 and info["records"] == 8 and info["samples"][1]["caption"] == "caption 1"
    # what the conversion read and skipped, and where its examples are
    assert info["converted"] == {"shards": 3, "shards_done": 3, "missing": [], "failed": [], "samples": 9,
                                 "written": 8, "skipped": {"missing_file": 1},
                                 "report": str(tmp_path / "out" / "reports" / "web-summary.json")}
    assert info["samples"][0]["image"] == "48x40"
    with pytest.raises(SystemExit) as exc:
        cli.main(["data", "convert", "--format", "csv", str(tmp_path / "l.csv"), "--out", str(tmp_path / "x")])
    assert exc.value.code == 2 and "no column 'image'" in capsys.readouterr().err

    from clip_jax.config import default_config
    from clip_jax.models.presets import model_preset

    config = default_config()
    config.batch_size, config.data.source, config.data.path = 4, "records", str(tmp_path / "out")
    config.model = model_preset("tiny", vocab_size=600, context_length=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny corpus cannot fill the vocabulary
        tokenizer = ClipTokenizer.train([f"caption {i}" for i in range(8)] * 3, 600)
    batch = next(iter(train_dataset(config, tokenizer)))
    size = config.model.vision.image_size
    assert batch["image"].shape == (4, size, size, 3) and batch["text"].shape == (4, 8)


def test_a_tables_negative_captions_train_negclip_from_its_records(tmp_path, caplog):
    """A table's negative caption column is kept in its records' metadata, where data.source 'records' reads it for
    method negclip: each example's negative is its row's, a record without one is dropped, a short caption is not
    trained on; shards without the key are one line at launch."""
    from clip_jax.config import ConfigError, default_config, method_config
    from clip_jax.data.pipeline import STATS, check_train_source, train_iterator
    from clip_jax.methods import get_method
    from clip_jax.models.presets import model_preset

    names = [f"{'x' * (i + 1)}.png" for i in range(5)]  # names of distinct lengths: images of distinct pixel values
    write_images(tmp_path, names)
    rows = [{"image": n, "caption": f"caption {i}", "short_caption": f"short {i}", "neg_caption": f"swapped  {i}"}
            for i, n in enumerate(names)]
    del rows[2]["neg_caption"]  # dropped in training
    rows[4]["neg_caption"] = "swapped \udc80 4"  # not UTF-8: kept with U+FFFD, and marked
    rows[0]["neg_caption"] = ["swapped 0", "swapped  zero"]  # a list: one drawn per example
    (tmp_path / "n.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    convert.convert("jsonl", [str(tmp_path / "n.jsonl")], str(tmp_path / "out"))

    config = default_config()
    config.model = model_preset("tiny", vocab_size=600, context_length=8)
    config.batch_size = 8
    config.data.update(source="records", path=str(tmp_path / "out"), augment=False, negative_captions=True,
                       negative_caption_field="neg_caption")
    config.method = method_config("negclip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny corpus cannot fill the vocabulary
        tokenizer = ClipTokenizer.train([f"caption {i} short {i} swapped {i}" for i in range(4)] * 3, 600)
    with caplog.at_level("WARNING"):
        check_train_source(config)
        batch = next(train_iterator(config, tokenizer, captions=get_method(config).captions()))
    assert "5 of the first 5 records have a short caption, which is not trained on with negative" in caplog.text
    assert "no neg_caption in its metadata" in caplog.text  # the row without one, dropped in the stream
    captions = {tuple(tokenizer([f"caption {i}"], 8)[0]): i for i in range(5)}
    negatives = [["swapped 0", "swapped zero"], ["swapped 1"], [], ["swapped 3"], ["swapped \ufffd 4"]]
    seen = []
    for text, negative in zip(batch["text"], batch["negative_text"], strict=True):
        i = captions[tuple(text)]  # the caption, never the short one
        assert tuple(negative) in {tuple(t) for t in tokenizer(negatives[i], 8)}  # whitespace collapsed
        seen.append(i)
    assert set(seen) == {0, 1, 3, 4}
    np.testing.assert_array_equal(batch[STATS]["bad_utf8"], [i == 4 for i in seen])

    config.data.negative_caption_field = "negative_caption"
    with pytest.raises(ConfigError, match="none of the first 5 records has 'negative_caption' in its metadata for "
                                          "its negative caption .*; name the key with data.negative_caption_field"):
        check_train_source(config)


def test_cli_formats_match_the_converter():
    parser = cli.build_parser()
    data = next(a for a in parser._subparsers._group_actions[0].choices["data"]._actions if a.dest == "data_command")
    fmt = next(a for a in data.choices["convert"]._actions if a.dest == "format")
    assert tuple(fmt.choices) == convert.FORMATS
    assert os.path.basename(records.shard_name("p", 3, 16)) == "p-00003-of-00016.arrayrecord"
