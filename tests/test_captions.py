"""File sources on small files written here: ShareGPT4V JSON, JSONL and CSV records (read by the converter's reader);
undecodable images dropped; and the Long-CLIP batch (long text truncated with EOT last, short text = the own short
caption or the long one's first sentence). Every kind of bad sample: tests/test_bad_samples.py."""

import json

import numpy as np
import pytest
from PIL import Image

from clip_jax.config import ConfigError, default_config, method_config
from clip_jax.data.captions import CaptionFileSource, Row, file_source, negative_captions, read_table
from clip_jax.data.images import load_image
from clip_jax.data.pipeline import STATS, DecodeExample, check_train_source, get_source, train_iterator
from clip_jax.data.tokenizer import ClipTokenizer
from clip_jax.methods import get_method
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
    source = file_source(str(sharegpt4v_file(folder)), "sharegpt4v", "", 0)
    assert [source[i]["path"] for i in range(len(NAMES))] == [str(folder / n) for n in NAMES]
    assert source[0]["long_caption"] == LONG[0].replace("\n", " ") and "short_caption" not in source[0]
    (folder / "broken.json").write_text(json.dumps([{"image": "a.png", "conversations": [{"from": "human"}]}]))
    assert file_source(str(folder / "broken.json"), "sharegpt4v", "", 0)[0]["long_caption"] == ""  # then dropped


def test_read_jsonl_and_csv(folder):
    rows = [{"image": "a.png", "caption": LONG[0], "short_caption": "a bicycle"},
            {"image": "b.jpg", "caption": LONG[1]}]
    (folder / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    csv_text = "image,caption,short_caption\n" + "".join(
        f'{r["image"]},"{r["caption"]}",{r.get("short_caption", "")}\n' for r in rows)
    (folder / "c.csv").write_text(csv_text)
    want = [{"path": str(folder / "a.png"), "long_caption": LONG[0].replace("\n", " "), "short_caption": "a bicycle",
             "bad_utf8": 0, "key": "a.png"},
            {"path": str(folder / "b.jpg"), "long_caption": LONG[1], "bad_utf8": 0, "key": "b.jpg"}]
    for fmt in ("jsonl", "csv"):
        source = file_source(str(folder / f"c.{fmt}"), None, "", 0)  # the format by the suffix
        assert [source[0], source[1]] == want, fmt
        assert [r.caption for r in read_table(str(folder / f"c.{fmt}"), fmt)] == [LONG[0], LONG[1]]  # as written
    (folder / "bad.csv").write_text("picture,caption\na.png,\n")
    with pytest.raises(ValueError, match="no column 'image'"):
        file_source(str(folder / "bad.csv"), None, "", 0)
    # open_clip's CSV columns, named in the config: the same rows as the default names give.
    (folder / "oc.csv").write_text(csv_text.replace("image,caption,short_caption", "filepath,title,short_caption"))
    config = default_config()
    config.data.source, config.data.path = "captions", str(folder / "oc.csv")
    config.data.image_field, config.data.caption_field = "filepath", "title"
    source = get_source(config, "train")
    assert [source[0], source[1]] == want


def test_undecodable_image_is_dropped(folder):
    source = file_source(str(sharegpt4v_file(folder)), "sharegpt4v", "", 0)
    assert source[1 + len(NAMES)] == source[1] and source[1]["path"] == str(folder / "bad.jpg")  # indices wrap
    decode = DecodeExample(SIZE, SIZE)
    good = decode.map(source[2])
    np.testing.assert_array_equal(good["image"], np.asarray(Image.open(folder / "b.jpg").convert("RGB")))
    assert good["long_caption"] == LONG[2] and "path" not in good and "key" not in good
    assert decode.map(source[1]) is None
    missing = CaptionFileSource([Row("nowhere.png", str(folder / "nowhere.png"), "x")])
    assert decode.map(missing[0]) is None


def longclip_config(source, path):
    config = default_config()
    config.model = model_preset("tiny", vocab_size=600, context_length=CONTEXT)
    config.model.vision.image_size = SIZE
    config.batch_size = 6
    config.data.source = source
    config.data.path = str(path)
    config.data.augment = False
    config.data.long_caption_prob = 1.0
    config.method = method_config("longclip", short_context_length=SHORT)
    return config


def longclip_batches(config, tokenizer):
    return train_iterator(config, tokenizer, captions=get_method(config).captions())


def test_longclip_batches_from_sharegpt4v(folder):
    tokenizer = ClipTokenizer.train(LONG * 3, 600)
    batch = next(longclip_batches(longclip_config("sharegpt4v", sharegpt4v_file(folder)), tokenizer))
    assert set(batch) == {"image", "text", "short_text", STATS}
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
    batch = next(longclip_batches(longclip_config("captions", folder / "c.jsonl"), tokenizer))
    shorts = {tuple(r): i for i, r in enumerate(tokenizer([r["short_caption"] for r in rows], SHORT))}
    for text, short in zip(batch["text"], batch["short_text"], strict=True):
        np.testing.assert_array_equal(text, tokenizer([LONG[shorts[tuple(short)]]], CONTEXT)[0])


def test_negative_captions_from_a_caption_file(folder, caplog):
    """data.negative_captions with a caption file (method negclip): each row's negative column stands against its
    caption; a row without one is dropped; a short caption is not trained on; a file without the column is one
    line at launch."""
    names = ("a.png", "b.jpg", "c.png")
    rows = [{"image": n, "caption": c, "short_caption": f"short {i}", "neg_caption": f"negative {i} {c}"}
            for i, (n, c) in enumerate(zip(names, LONG, strict=False))]
    rows[1].pop("neg_caption")  # b.jpg has no negative: dropped
    (folder / "n.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = default_config()
    config.model = model_preset("tiny", vocab_size=600, context_length=CONTEXT)
    config.model.vision.image_size = SIZE
    config.batch_size = 4
    config.data.update(source="captions", path=str(folder / "n.jsonl"), augment=False, negative_captions=True,
                       negative_caption_field="neg_caption")
    config.method = method_config("negclip")
    tokenizer = ClipTokenizer.train(LONG * 3 + [f"negative {i} short {i}" for i in range(3)] * 3, 600)
    with caplog.at_level("WARNING"):
        batch = next(train_iterator(config, tokenizer, captions=get_method(config).captions()))
    assert "3 rows have a short caption, which is not trained on with negative captions" in caplog.text
    assert "1 of 3 rows have no image path or no caption or no neg_caption; training drops them" in caplog.text
    assert batch["negative_text"].shape == batch["text"].shape == (4, CONTEXT)
    kept = {0: tokenizer([rows[0]["neg_caption"]], CONTEXT)[0], 2: tokenizer([rows[2]["neg_caption"]], CONTEXT)[0]}
    for text, negative in zip(batch["text"], batch["negative_text"], strict=True):
        i = next(i for i in kept if np.array_equal(text, tokenizer([LONG[i]], CONTEXT)[0]))  # the caption, not short
        np.testing.assert_array_equal(negative, kept[i])
    assert batch[STATS]["example_index"].max() >= 4  # the row without a negative was dropped, so others repeat

    (folder / "plain.jsonl").write_text("".join(json.dumps({"image": n, "caption": c}) + "\n"
                                                for n, c in zip(names, LONG, strict=False)))
    config.data.path = str(folder / "plain.jsonl")
    with pytest.raises(ConfigError, match="no row has a 'neg_caption' column or key for its negative caption; name "
                                          "it with data.negative_caption_field"):
        check_train_source(config)


def test_negative_caption_lists_as_negclips_own_tsv_has_them(folder):
    """NegCLIP's COCO TSV (columns filepath, title, neg_caption, neg_image) holds each row's negatives as a Python
    list literal: every example trains on one of its row's, drawn per example; a JSON list or a plain caption
    reads too, and a caption that only starts with '[' stays one caption."""
    names = ("a.png", "b.jpg", "c.png")
    negatives = [["the wall leans on a red bicycle", "a red wall leans on a bicycle"],
                 ["one boat on two lakes"],
                 ["[not a list] a kitchen"]]
    cells = [repr(negatives[0]), repr(negatives[1]), negatives[2][0]]  # repr: the literal NegCLIP's TSV holds
    (folder / "neg.tsv").write_text("filepath\ttitle\tneg_caption\tneg_image\n" + "".join(
        f"{n}\t{' '.join(c.split())}\t{cell}\t[1, 2]\n" for n, c, cell in zip(names, LONG, cells, strict=False)))
    assert negative_captions(cells[0]) == (tuple(negatives[0]), False)
    assert negative_captions(["a  b", "", "caf\udce9"]) == (("a b", "caf\ufffd"), True)  # a JSONL list; a bad byte
    assert negative_captions(cells[2]) == ((cells[2],), False)
    config = default_config()
    config.model = model_preset("tiny", vocab_size=600, context_length=CONTEXT)
    config.model.vision.image_size = SIZE
    config.batch_size = 48
    config.data.update(source="captions", path=str(folder / "neg.tsv"), augment=False, negative_captions=True,
                       image_field="filepath", caption_field="title", negative_caption_field="neg_caption")
    config.method = method_config("negclip")
    tokenizer = ClipTokenizer.train(LONG * 3 + [n for row in negatives for n in row] * 3, 600)
    batch = next(train_iterator(config, tokenizer, captions=get_method(config).captions()))
    rows = {tuple(tokenizer([" ".join(c.split())], CONTEXT)[0]): i for i, c in enumerate(LONG[:3])}
    drawn = {i: set() for i in range(3)}
    for text, negative in zip(batch["text"], batch["negative_text"], strict=True):
        i = rows[tuple(text)]
        options = {tuple(tokenizer([n], CONTEXT)[0]): n for n in negatives[i]}
        drawn[i].add(options[tuple(negative)])  # one of its own row's
    assert drawn == {i: set(row) for i, row in enumerate(negatives)}  # both of the first row's are drawn


def test_a_set_of_undecodable_images_is_an_error_not_a_hang(folder):
    (folder / "bad.jsonl").write_text(json.dumps({"image": "bad.jpg", "caption": LONG[0]}) + "\n")
    tokenizer = ClipTokenizer.train(LONG * 3, 600)
    with pytest.raises(ValueError, match="no decodable image or no caption: check data.path and data.image_root"):
        next(longclip_batches(longclip_config("captions", folder / "bad.jsonl"), tokenizer))


def test_a_table_is_read_once_per_version_of_the_file(folder, monkeypatch):
    # The launch's check, the tokenizer corpus and the stream each ask for the source; a big table takes a while.
    from clip_jax.data import captions
    from clip_jax.data.pipeline import check_train_source

    captions._cached_source.cache_clear()
    reads = []
    monkeypatch.setattr(captions, "read_table", lambda *a: reads.append(a[0]) or read_table(*a))
    table = folder / "t.csv"
    table.write_text("image,caption\na.png,a red square\n")
    config = default_config()
    config.data.source, config.data.path = "captions", str(table)
    check_train_source(config)
    first = get_source(config, "train")
    assert get_source(config, "train") is first and len(reads) == 1
    table.write_text("image,caption\na.png,a red square\nc.png,a blue disc\n")  # edited between two runs
    assert [get_source(config, "train")[i]["long_caption"] for i in range(2)] == ["a red square", "a blue disc"]
    assert len(reads) == 2


def test_a_trained_tokenizer_reads_captions_from_across_a_table(tmp_path):
    """It read the first 3,000 rows alone: a table sorted by language gave a vocabulary of its first language, the
    others' captions then byte by byte (24 tokens against 9)."""
    from clip_jax.config import load_config
    from clip_jax.data.pipeline import tokenizer_corpus

    rows = "".join(f"img{i}.png,caption {i}\n" for i in range(10))
    (tmp_path / "t.csv").write_text("image,caption\n" + rows)
    config = load_config("configs/demo.py", ["--config.data.source=captions",
                                             f"--config.data.path={tmp_path / 't.csv'}"])
    assert tokenizer_corpus(config, n=4) == ["caption 0", "caption 3", "caption 6", "caption 9"]  # first to last
    assert tokenizer_corpus(config, n=12)[-2:] == ["caption 0", "caption 1"]  # a small table: every row, and again


def test_text_lines_end_at_line_ends_only():
    """str.splitlines also splits at U+2028, U+2029, U+0085 and \\x0b-\\x1e, which a caption or a class name may
    hold."""
    from clip_jax.data.captions import text_lines

    assert text_lines("a\u2028b\r\nc\x85d\re\x0cf\n\ng\n") == ["a\u2028b", "c\x85d", "e\x0cf", "", "g"]
    assert text_lines("") == [] and text_lines("one") == ["one"]


def test_a_table_mostly_not_utf8_is_said_to_be_in_another_encoding(tmp_path, caplog):
    """A table saved as GBK trained on U+FFFD captions, said only as a count: the likely cause is named."""
    from clip_jax.data.captions import CaptionFileSource, read_table

    (tmp_path / "t.csv").write_bytes("image,caption\na.png,红色的圆\nb.png,蓝色的方块\nc.png,a cat\n".encode("gb18030"))
    with caplog.at_level("WARNING"):
        CaptionFileSource(read_table(str(tmp_path / "t.csv"), "csv"), "t.csv")
    assert "2 of 3 rows have captions with bytes that are not UTF-8" in caplog.text
    assert "likely in another encoding (GBK, Shift-JIS, Latin-1): save it as UTF-8" in caplog.text
