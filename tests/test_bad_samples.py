"""Bad samples at training time (docs/data.md): a caption file and a record shard set written here, with one sample of
every bad kind among good ones. Each is dropped, converted or marked as documented and counted exactly: the reader's
warnings, each example's marks and stream position (also through a grain worker process), and the data_* metrics of
a short training run. The expected counts come from the sample table below, by hand; where a count depends on the
shuffle (how many dropped samples precede the last example read), the order is grain's own shuffle of the indices."""

import io
import logging
import warnings

import grain
import msgpack
import numpy as np
import pytest
from PIL import Image

from clip_jax import cli
from clip_jax.config import default_config
from clip_jax.data import records
from clip_jax.data.captions import file_source
from clip_jax.data.pipeline import MARKS, STATS, DataCounts, train_dataset
from clip_jax.data.tokenizer import ClipTokenizer
from clip_jax.models.presets import model_preset
from clip_jax.train.metrics import read_metrics

from .test_end_to_end import DEMO, TINY

IMAGE, CONTEXT, VOCAB = 32, 16, 600  # TINY's
LONG_CAPTION = " ".join(f"word{i % 50}" for i in range(500))
# Marks in the order of pipeline.MARKS: converted, upscaled, bad_utf8, truncated_caption.
PLAIN, CONVERTED, UPSCALED, BAD_UTF8, TRUNCATED = (0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)
DROPPED = None
# (image kind, caption kind, marks as a caption-file row, marks as a record); the row index is the position here.
SAMPLES = [
    *[(f"good{i}", "plain", PLAIN, PLAIN) for i in range(9)],
    ("gray", "plain", CONVERTED, CONVERTED),  # grayscale PNG
    ("cmyk", "plain", CONVERTED, CONVERTED),  # CMYK JPEG
    ("rgba", "plain", CONVERTED, CONVERTED),  # RGBA PNG
    ("deep", "plain", CONVERTED, CONVERTED),  # 16-bit PNG
    ("small", "plain", UPSCALED, UPSCALED),  # 16x16, below the model's 32 px: upsampled
    ("good9", "latin1", BAD_UTF8, DROPPED),  # a Latin-1 byte: replaced in a file; a record of it does not parse
    ("good10", "long", TRUNCATED, TRUNCATED),  # 500 words: cut to the context
    ("truncated", "plain", DROPPED, DROPPED),  # a JPEG cut in half
    ("garbage", "plain", DROPPED, DROPPED),  # random bytes
    ("missing", "plain", DROPPED, DROPPED),  # no such file / a record without image bytes
    ("tiny", "plain", DROPPED, DROPPED),  # 4x4, below pipeline.MIN_IMAGE_SIDE
    ("good11", "empty", DROPPED, DROPPED),  # only whitespace
    ("bad_row", "plain", DROPPED, DROPPED),  # a JSONL line that is not JSON / bytes that are not a record
]
FILE_KEPT = sum(s[2] is not DROPPED for s in SAMPLES)
assert FILE_KEPT == 16  # TINY's batch: in the training run every step reads exactly one pass over the file


def image_bytes(kind: str, rng: np.random.Generator) -> bytes:
    def encode(img: Image.Image, fmt: str) -> bytes:
        out = io.BytesIO()
        img.save(out, fmt)
        return out.getvalue()

    noise = Image.fromarray(rng.integers(0, 256, (36, 40, 3), np.uint8))
    if kind.startswith("good"):
        return encode(noise, "PNG" if int(kind[4:]) % 2 else "JPEG")
    return {
        "gray": lambda: encode(noise.convert("L"), "PNG"),
        "cmyk": lambda: encode(noise.convert("CMYK"), "JPEG"),
        "rgba": lambda: encode(noise.convert("RGBA"), "PNG"),
        "deep": lambda: encode(Image.fromarray(rng.integers(0, 4096, (36, 40), np.uint16)), "PNG"),
        "small": lambda: encode(noise.resize((16, 16)), "PNG"),
        "truncated": lambda: (b := encode(noise, "JPEG"))[: len(b) // 2],
        "garbage": lambda: rng.bytes(300),
        "tiny": lambda: encode(noise.resize((4, 4)), "PNG"),
    }[kind]()


def caption(i: int, kind: str) -> str:
    """The caption as training sees it (unique per row: examples are told apart by their text)."""
    return {"plain": f"photo number {i}", "latin1": f"caf\ufffd number {i}", "long": LONG_CAPTION, "empty": ""}[kind]


def raw_caption(i: int, kind: str) -> bytes:
    return caption(i, kind).replace("\ufffd", "\udce9").encode("utf-8", "surrogateescape") if kind != "empty" else b"  "


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The samples as a JSONL file with image files beside it, and as one record shard."""
    folder = tmp_path_factory.mktemp("bad_samples")
    rng = np.random.default_rng(0)
    lines, blobs = [], []
    for i, (kind, text, _, _) in enumerate(SAMPLES):
        name = f"{i:02d}-{kind}.img"
        data = b"" if kind in ("missing", "bad_row") else image_bytes(kind, rng)
        if data:
            (folder / name).write_bytes(data)
        # JSON with the caption's bytes as they are: a Latin-1 byte stays a raw byte in the file.
        lines.append(b'{"image": "%s", "caption": "%s"}\n' % (name.encode(), raw_caption(i, text)))
        blobs.append(msgpack.packb({"v": 1, "image": data, "caption": caption(i, text).replace("\ufffd", "\udce9")},
                                   use_bin_type=True, unicode_errors="surrogateescape"))
    lines[-1], blobs[-1] = b"{not json\n", b"not msgpack \xc1"
    (folder / "captions.jsonl").write_bytes(b"".join(lines))
    with records.ShardWriter(folder / records.shard_name("bad", 0, 1)) as writer:
        for blob in blobs:
            writer.write(blob)
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny corpus cannot fill the vocabulary
        return ClipTokenizer.train([caption(i, s[1]) for i, s in enumerate(SAMPLES)] * 3, VOCAB)


def config_for(source: str, path, batch_size: int, workers: int = 0):
    config = default_config()
    config.model = model_preset("tiny", vocab_size=VOCAB, context_length=CONTEXT)
    config.model.vision.image_size = IMAGE
    config.batch_size = batch_size
    config.data.source, config.data.path, config.data.workers = source, str(path), workers
    config.data.augment = False
    return config


def dropped_before(n_kept: int, marks: list) -> int:
    """Dropped samples among the stream positions up to the n_kept-th kept example: the stream is grain's shuffle of
    the sample indices, epoch after epoch (pipeline.train_dataset; seed 0, one host)."""
    order = grain.MapDataset.range(len(marks)).shuffle(seed=0).repeat()
    kept = dropped = position = 0
    while kept < n_kept:
        if marks[order[position]] is DROPPED:
            dropped += 1
        else:
            kept += 1
        position += 1
    return dropped


def test_caption_file_reader_counts_and_warns(data, caplog):
    with caplog.at_level(logging.WARNING, logger="clip_jax.data.captions"):
        source = file_source(str(data / "captions.jsonl"), None, "", 0)
    assert len(source) == len(SAMPLES)  # every row stays: the stream drops and counts
    assert "1 of 22 rows have captions with bytes that are not UTF-8" in caplog.text
    assert "2 of 22 rows have no image path or no caption" in caplog.text
    rows = range(len(SAMPLES) - 1)  # the last is the bad row: no caption, an error
    assert [source[i]["long_caption"] for i in rows] == [caption(i, SAMPLES[i][1]) for i in rows]
    assert [source[i]["bad_utf8"] for i in rows] == [int(SAMPLES[i][2] == BAD_UTF8) for i in rows]
    assert source[rows[-1] + 1] | {"key": ""} == {"path": "", "long_caption": "", "bad_utf8": 0, "key": "",
                                                  "error": "bad_row"}
    # The same rows as CSV (the bad row: no image path) give the same items.
    csv_lines = [b"image,caption\n"] + [b"%s,%s\n" % (b"" if s[0] == "bad_row" else f"{i:02d}-{s[0]}.img".encode(),
                                                       raw_caption(i, s[1])) for i, s in enumerate(SAMPLES)]
    (data / "captions.csv").write_bytes(b"".join(csv_lines))
    from_csv = file_source(str(data / "captions.csv"), None, "", 0)
    for i in range(len(SAMPLES)):
        assert {k: v for k, v in from_csv[i].items() if k != "key"} == {
            k: v for k, v in source[i].items() if k != "key"}, i


@pytest.mark.parametrize("source, batch, workers", [("captions", 8, 0), ("records", 5, 0), ("captions", 8, 1)])
def test_stream_marks_and_drops_exactly(data, tokenizer, source, batch, workers):
    """Two passes over the samples: every example carries its row's marks, the positions no batch holds are those of
    the dropped rows, and DataCounts turns the batches into the hand counts."""
    column = 2 if source == "captions" else 3
    marks = [s[column] for s in SAMPLES]
    kept = sum(m is not DROPPED for m in marks)
    assert kept % batch == 0
    path = data / ("captions.jsonl" if source == "captions" else records.shard_name("bad", 0, 1))
    iterator = iter(train_dataset(config_for(source, path, batch, workers), tokenizer))
    row_of = {tuple(t): i for i, t in enumerate(tokenizer([caption(i, s[1]) for i, s in enumerate(SAMPLES)], CONTEXT))}
    counts, positions, seen = DataCounts(), [], []
    for _ in range(2 * kept // batch):
        got = next(iterator)
        stats = got[STATS]
        for r, text in enumerate(got["text"]):
            row = row_of[tuple(text)]
            assert marks[row] is not DROPPED, SAMPLES[row]
            assert tuple(int(stats[m][r]) for m in MARKS) == marks[row], SAMPLES[row]
            seen.append(row)
        positions += stats["example_index"].tolist()
        assert got["image"].shape == (batch, IMAGE, IMAGE, 3) and got["image"].dtype == np.uint8
        counts.take(got)
        assert set(got) == {"image", "text"}  # what goes to the device
    assert sorted(seen) == sorted(2 * [i for i, m in enumerate(marks) if m is not DROPPED])
    order = grain.MapDataset.range(len(SAMPLES)).shuffle(seed=0).repeat()
    assert sorted(set(range(positions[-1] + 1)) - set(positions)) == [
        p for p in range(positions[-1] + 1) if marks[order[p]] is DROPPED]
    totals = {"converted": 2 * 4, "upscaled": 2 * 1, "bad_utf8": 2 * int(source == "captions"),
              "truncated_caption": 2 * 1}
    assert counts.metrics(len(seen) // batch) == {"data_dropped": dropped_before(2 * kept, marks)} | {
        f"data_{m}": totals[m] for m in MARKS}
    if workers:
        iterator.close()


def test_dropped_count_survives_a_resume(data, tokenizer):
    """A run resumed from an iterator state counts the drops since step 0 (positions are absolute), not since the
    resume."""
    config = config_for("captions", data / "captions.jsonl", 8)
    iterator, counts = iter(train_dataset(config, tokenizer)), DataCounts()
    for _ in range(3):
        counts.take(next(iterator))
    state = iterator.get_state()
    for _ in range(2):
        counts.take(next(iterator))
    resumed, counts_after = iter(train_dataset(config, tokenizer)), DataCounts()
    resumed.set_state(state)
    for _ in range(2):
        counts_after.take(next(resumed))
    want = dropped_before(5 * 8, [s[2] for s in SAMPLES])
    assert counts.metrics(5)["data_dropped"] == counts_after.metrics(5)["data_dropped"] == want > 6


def test_training_run_logs_the_counts(data, tmp_path):
    """4 steps of 16 = 4 passes over the file's 16 good samples, a log every 2 steps: nothing crashes, and each log
    record holds 2 passes' marks and the drops so far."""
    workdir = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny corpus cannot fill the vocabulary
        cli.main(["train", "--config", DEMO, "--workdir", str(workdir), *TINY, "--config.data.source=captions",
                  f"--config.data.path={data / 'captions.jsonl'}"])
    train = [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    marks = [s[2] for s in SAMPLES]
    for r in train:
        assert np.isfinite(r["loss"])
        assert (r["data_converted"], r["data_upscaled"], r["data_bad_utf8"], r["data_truncated_caption"]) == (
            2 * 4, 2 * 1, 2 * 1, 2 * 1)
        assert r["data_dropped"] == dropped_before(r["step"] * FILE_KEPT, marks)
    # Dropped samples accumulate: 6 per pass, those after the last good sample of a pass counted with the next.
    assert 6 <= train[0]["data_dropped"] <= 12 and 18 <= train[1]["data_dropped"] <= 24
