"""File sources on small files written here: ShareGPT4V JSON, JSONL and CSV records; undecodable images skipped and
counted; and the Long-CLIP batch (long text truncated with EOT last, short text = the own short caption or the
long one's first sentence)."""

import json

import numpy as np
import pytest
from PIL import Image

from clip_jax.config import default_config
from clip_jax.data.captions import CaptionFileSource, Record, read_captions, read_sharegpt4v
from clip_jax.data.images import load_image
from clip_jax.data.pipeline import train_iterator
from clip_jax.data.tokenizer import ClipTokenizer
from clip_jax.models.presets import model_preset

SIZE, CONTEXT, SHORT = 32, 24, 8
LONG = [
    "A red bicycle leans on a wall. The wall is\nbrick and old. A cat sleeps beside the front wheel in the sun",
    "Two boats on a lake. One is blue. The water is calm and the sky is grey with a few low clouds over the hills",
    "A kitchen table. Plates, cups and a bowl of green apples stand on a white cloth near the open window",
    "A snowy street at night. Lamps light the parked cars and a bus waits at the far corner with its doors open",
]
NAMES = ("a.png", "bad.jpg", "b.jpg", "c.png")  # the records' images, captions LONG in order; bad.jpg is corrupt
GOOD = (0, 2, 3)


@pytest.fixture()
def folder(tmp_path):
    for i, name in enumerate(n for n in NAMES if n != "bad.jpg"):
        Image.new("RGB", (40, 30), (60 * i, 200 - 60 * i, 90)).save(tmp_path / name)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    return tmp_path


def sharegpt4v_file(folder):
    entries = [{"id": str(i), "image": name, "conversations": [
        {"from": "human", "value": "<image>\nDescribe the picture in detail."}, {"from": "gpt", "value": caption}]}
        for i, (name, caption) in enumerate(zip(NAMES, LONG, strict=True))]
    path = folder / "share.json"
    path.write_text(json.dumps(entries))
    return path


def test_read_sharegpt4v(folder):
    records = read_sharegpt4v(sharegpt4v_file(folder))
    assert [r.image for r in records] == list(NAMES)
    assert records[0].long_caption == LONG[0].replace("\n", " ") and records[0].short_caption is None
    (folder / "broken.json").write_text(json.dumps([{"image": "a.png", "conversations": [{"from": "human"}]}]))
    with pytest.raises(ValueError, match="record 0 has no 'image' or no 'gpt' turn"):
        read_sharegpt4v(folder / "broken.json")


def test_read_jsonl_and_csv(folder):
    rows = [{"image": "a.png", "caption": LONG[0], "short_caption": "a bicycle"},
            {"image": "b.jpg", "caption": LONG[1]}]
    (folder / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    csv_text = "image,caption,short_caption\n" + "".join(
        f'{r["image"]},"{r["caption"]}",{r.get("short_caption", "")}\n' for r in rows)
    (folder / "c.csv").write_text(csv_text)
    want = [Record("a.png", LONG[0].replace("\n", " "), "a bicycle"), Record("b.jpg", LONG[1], None)]
    assert read_captions(folder / "c.jsonl") == want
    assert read_captions(folder / "c.csv") == want
    (folder / "bad.csv").write_text("image,caption\na.png,\n")
    with pytest.raises(ValueError, match="row 0 needs 'image' and 'caption'"):
        read_captions(folder / "bad.csv")


def test_undecodable_image_is_dropped_and_counted(folder):
    source = CaptionFileSource(read_sharegpt4v(sharegpt4v_file(folder)), folder, SIZE)
    assert source[1 + len(NAMES)] == {"path": str(folder / "bad.jpg"), "long_caption": LONG[1]}  # indices wrap
    good = source.decode.map(source[2])
    np.testing.assert_array_equal(good["image"], load_image(folder / "b.jpg", SIZE))
    assert good["long_caption"] == LONG[2] and "path" not in good
    assert source.decode.map(source[1]) is None and source.decode.failures == 1
    missing = CaptionFileSource([Record("nowhere.png", "x")], folder, SIZE)
    assert missing.decode.map(missing[0]) is None and missing.decode.failures == 1


def longclip_config(source, path):
    config = default_config()
    config.model = model_preset("tiny", vocab_size=600, context_length=CONTEXT)
    config.model.vision.image_size = SIZE
    config.batch_size = 6
    config.data.source = source
    config.data.path = str(path)
    config.data.augment = False
    config.data.long_caption_prob = 1.0
    config.data.short_context_length = SHORT
    config.loss.name = "longclip"
    return config


def test_longclip_batches_from_sharegpt4v(folder):
    tokenizer = ClipTokenizer.train(LONG * 3, 600)
    batch = next(train_iterator(longclip_config("sharegpt4v", sharegpt4v_file(folder)), tokenizer))
    assert set(batch) == {"image", "text", "short_text"}
    assert batch["text"].shape == (6, CONTEXT) and batch["short_text"].shape == (6, SHORT)
    record_of = {tuple(row): i for i, row in enumerate(tokenizer(LONG, CONTEXT))}
    for text, short, image in zip(batch["text"], batch["short_text"], batch["image"], strict=True):
        i = record_of[tuple(text)]
        assert i in GOOD  # bad.jpg's record never appears
        assert text[-1] == tokenizer.eot_id  # longer than the context: cut, EOT last
        np.testing.assert_array_equal(short, tokenizer([LONG[i].split(". ")[0]], SHORT)[0])
        np.testing.assert_array_equal(image, load_image(folder / NAMES[i], SIZE))


def test_own_short_captions_from_jsonl(folder):
    rows = [{"image": n, "caption": c, "short_caption": f"short {i}"}
            for i, (n, c) in enumerate(zip(("a.png", "b.jpg", "c.png"), LONG, strict=False))]
    (folder / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = ClipTokenizer.train(LONG * 3 + ["short 0 short 1 short 2"] * 3, 600)
    batch = next(train_iterator(longclip_config("captions", folder / "c.jsonl"), tokenizer))
    shorts = {tuple(r): i for i, r in enumerate(tokenizer([r["short_caption"] for r in rows], SHORT))}
    for text, short in zip(batch["text"], batch["short_text"], strict=True):
        np.testing.assert_array_equal(text, tokenizer([LONG[shorts[tuple(short)]]], CONTEXT)[0])


def test_a_set_of_undecodable_images_is_an_error_not_a_hang(folder):
    (folder / "bad.jsonl").write_text(json.dumps({"image": "bad.jpg", "caption": LONG[0]}) + "\n")
    tokenizer = ClipTokenizer.train(LONG * 3, 600)
    with pytest.raises(ValueError, match="images read cannot be decoded: check data.image_root"):
        next(train_iterator(longclip_config("captions", folder / "bad.jsonl"), tokenizer))
