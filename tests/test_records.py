"""Our ArrayRecord format and its training source: records round-trip, shards appear only when complete, shard
lists are checked, and the grain pipeline over shards is a global, deterministic, resumable shuffle of exactly the
decodable records, split disjointly over hosts, with undecodable ones dropped (missing from the stream's
positions)."""

import io
import warnings

import grain
import numpy as np
import pytest
from PIL import Image

from clip_jax.config import default_config
from clip_jax.data import pipeline, records
from clip_jax.data.images import (
    crop_min_side,
    decode_image,
    open_image,
    random_crop_box,
    random_resized_crop,
)
from clip_jax.data.pipeline import STATS, tokenizer_corpus, train_dataset
from clip_jax.data.tokenizer import ClipTokenizer
from clip_jax.models.presets import model_preset

N_GOOD, PER_SHARD, BATCH, IMAGE, CONTEXT, VOCAB = 24, 7, 4, 16, 16, 600
BAD_INDICES = (6, 19)  # where write_set puts the two bad records


def encode(array, fmt="PNG", mode=None, **kw):
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def colour(i):
    """A solid colour identifying record i (PNG keeps it exact, through resizing too)."""
    return np.array([10 * i, 255 - 10 * i, (37 * i) % 256], np.uint8)


def write_set(directory, prefix="train", bad=True):
    """N_GOOD solid-colour records (caption "record i") and two bad ones, over ceil(26 / PER_SHARD) shards."""
    blobs = []
    for i in range(N_GOOD):
        image = np.broadcast_to(colour(i), (20 + i, 30, 3)).copy()
        blobs.append(records.encode_record(encode(image), f"record {i}", key=f"k{i}"))
        if i == 5 and bad:
            blobs.append(records.encode_record(b"\x89PNG\r\n\x1a\n broken", "never seen", key="corrupt"))
        if i == 17 and bad:
            blobs.append(b"not msgpack at all \xc1")
    count = -(-len(blobs) // PER_SHARD)
    for s in range(count):
        with records.ShardWriter(directory / records.shard_name(prefix, s, count)) as writer:
            for blob in blobs[s * PER_SHARD : (s + 1) * PER_SHARD]:
                writer.write(blob)
    return count


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("records")
    write_set(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny corpus cannot fill the vocabulary
        return ClipTokenizer.train([f"record {i}" for i in range(N_GOOD)] * 4, VOCAB)


def make_config(path, seed=0):
    config = default_config()
    config.seed = seed
    config.batch_size = BATCH
    config.model = model_preset("tiny", vocab_size=VOCAB, context_length=CONTEXT)
    config.model.vision.image_size = IMAGE
    config.data.source = "records"
    config.data.path = str(path)
    config.data.augment = False  # centre crop: a record's pixels stay its colour
    return config


def identify(batch, tokenizer):
    """The record index of every example, checking that its caption is that record's caption."""
    ids = []
    for image, text in zip(batch["image"], batch["text"], strict=True):
        assert (image == image[0, 0]).all()
        i = next(i for i in range(N_GOOD) if (image[0, 0] == colour(i)).all())
        np.testing.assert_array_equal(text, tokenizer([f"record {i}"], CONTEXT)[0])
        ids.append(i)
    return ids


# --- Format ---------------------------------------------------------------------------------------------------


def test_record_round_trip():
    data = records.encode_record(b"\xff\xd8jpeg", "a long caption " * 50, short_caption="short", key="00042",
                                 metadata={"url": "http://x/é", "width": 640})
    record = records.decode_record(data)
    assert record["image"] == b"\xff\xd8jpeg" and record["caption"] == "a long caption " * 50
    assert record["short_caption"] == "short" and record["key"] == "00042"
    assert records.record_metadata(record) == {"url": "http://x/é", "width": 640}
    bare = records.decode_record(records.encode_record(b"x", "c"))
    assert set(bare) == {"v", "image", "caption"} and records.record_metadata(bare) is None
    for garbage in (b"", b"\x93\x01\x02\x03", records.encode_record(b"x", "c").replace(b"\x01", b"\x02", 1)):
        with pytest.raises(ValueError, match="not a clip_jax record"):
            records.decode_record(garbage)


def test_shard_writer_renames_only_complete_shards(tmp_path):
    path = tmp_path / records.shard_name("web", 3, 16)
    assert path.name == "web-00003-of-00016.arrayrecord"
    with records.ShardWriter(path) as writer:
        writer.write(b"one")
        assert not path.exists() and len(list(tmp_path.iterdir())) == 1  # under its temporary name
    assert path.exists() and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(RuntimeError), records.ShardWriter(tmp_path / "failed.arrayrecord") as writer:
        writer.write(b"two")
        raise RuntimeError("conversion failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert len(grain.sources.ArrayRecordDataSource([str(path)])) == 1


def test_list_shards(tmp_path):
    for i in (0, 1, 3):
        with records.ShardWriter(tmp_path / records.shard_name("a", i, 4)) as w:
            w.write(b"x")
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"3 of 4 'a' shards present \(missing 00002\)"):
        records.list_shards(str(tmp_path))
    names = [p.rsplit("/", 1)[1] for p in records.list_shards(f"{tmp_path}/a-0000[13]-*")]
    assert names == ["a-00001-of-00004.arrayrecord", "a-00003-of-00004.arrayrecord"]
    single = str(tmp_path / records.shard_name("a", 0, 4))
    assert records.list_shards(f"{single}, {tmp_path}/a-00003*") == [single, str(tmp_path / "a-00003-of-00004"
                                                                               ".arrayrecord")]
    with records.ShardWriter(tmp_path / records.shard_name("a", 2, 4)) as w:
        w.write(b"x")
    assert len(records.list_shards(str(tmp_path))) == 4
    with pytest.raises(FileNotFoundError):
        records.list_shards(f"{tmp_path}/b-*")
    # a second set beside it (`data convert --prefix`): the folder mixed both sets
    with records.ShardWriter(tmp_path / records.shard_name("b", 0, 1)) as w:
        w.write(b"x")
    with pytest.raises(FileNotFoundError, match=r"holds more than one set of shards \(4 'a' shards of 4, 1 'b' shards "
                                                r"of 1\), and a folder stands for one: name a set with a glob, e.g. "
                                                rf"{tmp_path}/a-\*\.arrayrecord"):
        records.list_shards(str(tmp_path))
    assert len(records.list_shards(f"{tmp_path}/a-*.arrayrecord")) == 4
    with pytest.raises(FileNotFoundError):
        records.list_shards(str(tmp_path / "nowhere"))


def test_decode_image_modes_and_jpeg_draft():
    rgb = np.random.default_rng(0).integers(0, 256, (6, 8, 3), np.uint8)
    for mode in ("L", "RGBA", "P", "CMYK"):
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        out, file_mode = decode_image(encode(rgb, fmt, mode))
        assert out.shape == (6, 8, 3) and out.dtype == np.uint8 and file_mode == mode, mode
    out, file_mode = decode_image(encode(rgb))
    np.testing.assert_array_equal(out, rgb)
    assert file_mode == "RGB"
    deep = Image.fromarray(np.full((4, 4), 4000, np.uint16))  # 16-bit: scaled by its maximum, not clipped at 255
    buf = io.BytesIO()
    deep.save(buf, "PNG")
    assert (decode_image(buf.getvalue())[0] == 255).all()
    photo = encode(np.zeros((768, 1024, 3), np.uint8), "JPEG")
    assert decode_image(photo)[0].shape == (768, 1024, 3)
    assert decode_image(photo, min_side=200)[0].shape == (384, 512, 3)  # 1/4 would be 192 < 200
    assert crop_min_side(224, True, (0.8, 1.0)) == 290 and crop_min_side(224, False, (0.8, 1)) == 224


def test_random_crop_box_stays_inside_with_the_asked_area_and_aspect():
    rng = np.random.default_rng(0)
    for height, width in ((300, 400), (512, 256), (97, 131)):
        for _ in range(200):
            left, top, cw, ch = random_crop_box(height, width, rng, (0.3, 0.9), (3 / 4, 4 / 3))
            assert 0 <= left and left + cw <= width and 0 <= top and top + ch <= height
            # rounding to whole pixels moves the area and aspect by at most a pixel a side
            assert 0.3 * height * width - cw - ch - 1 <= cw * ch <= 0.9 * height * width + cw + ch + 1
            assert 3 / 4 - 1 / min(cw, ch) <= cw / ch <= 4 / 3 + 1 / min(cw, ch)
    # an aspect no box of that area fits: after ten tries, the central square
    assert random_crop_box(100, 400, rng, (1.0, 1.0), (1.0, 1.0)) == (150, 0, 100, 100)
    # the crop cuts that box out: a one-pixel-per-column gradient keeps the box's columns in order
    image = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (64, 256, 3)).copy()
    left, _, cw, _ = random_crop_box(64, 256, np.random.default_rng(5), (0.5, 0.5))
    out = random_resized_crop(image, cw, np.random.default_rng(5), (0.5, 0.5))
    np.testing.assert_array_equal(out[0, :, 0], np.arange(left, left + cw))


def test_crop_of_the_decoded_pil_image_is_the_crop_of_its_array():
    """The pipeline crops the PIL image that `open_image` decodes (`DecodeExample`), skipping the copy to an array and
    back: the same pixels as cropping `decode_image`'s array, for a JPEG at full and at reduced scale, and a PNG."""
    rgb = np.random.default_rng(0).integers(0, 256, (700, 900, 3), np.uint8)
    for data, min_side in ((encode(rgb, "JPEG"), 0), (encode(rgb, "JPEG"), 300), (encode(rgb, "PNG"), 0)):
        image, mode = open_image(data, min_side)
        array, array_mode = decode_image(data, min_side)
        assert isinstance(image, Image.Image) and image.mode == "RGB" and mode == array_mode
        np.testing.assert_array_equal(np.asarray(image), array)
        for seed in range(5):
            crops = [random_resized_crop(x, 224, np.random.default_rng(seed), (0.08, 1.0)) for x in (image, array)]
            assert crops[0].shape == (224, 224, 3) and crops[0].dtype == np.uint8
            np.testing.assert_array_equal(*crops)


# --- Training source ------------------------------------------------------------------------------------------


def test_records_source_items_and_tokenizer_corpus(shards):
    config = make_config(shards)
    source = pipeline.get_source(config, "train")
    assert len(source) == N_GOOD + 2
    assert source[0]["long_caption"] == "record 0" and source[0]["image_bytes"].startswith(b"\x89PNG")
    corpus = tokenizer_corpus(config, n=10)
    assert corpus[:6] == [f"record {i}" for i in range(6)]


def test_epoch_is_a_global_shuffle_of_the_decodable_records(shards, tokenizer):
    iterator = iter(train_dataset(make_config(shards), tokenizer))
    batches = [next(iterator) for _ in range(N_GOOD // BATCH)]  # one epoch: 24 good records, 6 batches
    assert set(batches[0]) == {"image", "text", STATS}
    assert batches[0]["image"].shape == (BATCH, IMAGE, IMAGE, 3) and batches[0]["text"].dtype == np.int32
    order = [i for b in batches for i in identify(b, tokenizer)]
    assert sorted(order) == list(range(N_GOOD))  # every good record once, the bad ones never
    assert order != sorted(order)
    assert len({i // PER_SHARD for i in order[:BATCH]}) > 1  # the first batch already mixes shards
    # The stream positions no batch holds are those of the bad records, in the order grain's shuffle gives them.
    positions = [p for b in batches for p in b[STATS]["example_index"]]
    shuffled = grain.MapDataset.range(N_GOOD + 2).shuffle(seed=0).repeat()
    assert sorted(set(range(positions[-1] + 1)) - set(positions)) == [
        p for p in range(positions[-1] + 1) if shuffled[p] in BAD_INDICES]


def test_a_batch_larger_than_the_data_set_is_said(shards, tokenizer, caplog):
    """Each batch would hold some pairs twice, the contrastive loss taking each copy as the other's negative."""
    config = make_config(shards)
    with caplog.at_level("WARNING", logger="clip_jax.data.pipeline"):
        train_dataset(config, tokenizer)
        assert "fewer than batch_size" not in caplog.text
        config.batch_size = N_GOOD + 4
        train_dataset(config, tokenizer)
    assert f"data.path holds {N_GOOD + 2} examples, fewer than batch_size {N_GOOD + 4}" in caplog.text


def test_same_seed_same_stream_and_resume_from_state(shards, tokenizer):
    def stream(seed, n):
        it = iter(train_dataset(make_config(shards, seed), tokenizer))
        return [identify(next(it), tokenizer) for _ in range(n)]

    assert stream(0, 8) == stream(0, 8)
    assert stream(1, 8) != stream(0, 8)
    it = iter(train_dataset(make_config(shards), tokenizer))
    for _ in range(5):  # into the second epoch, past bad records
        next(it)
    state = it.get_state()
    expected = [identify(next(it), tokenizer) for _ in range(3)]
    resumed = iter(train_dataset(make_config(shards), tokenizer))
    resumed.set_state(state)
    assert [identify(next(resumed), tokenizer) for _ in range(3)] == expected


def test_hosts_read_disjoint_rows_of_each_global_batch(tmp_path, tokenizer):
    write_set(tmp_path, bad=False)  # with none dropped, host batches line up with global ones
    config = make_config(tmp_path)
    config.batch_size = 2 * BATCH

    def stream(rows, n=N_GOOD // (2 * BATCH)):  # one epoch
        it = iter(train_dataset(config, tokenizer, rows=rows))
        return [identify(next(it), tokenizer) for _ in range(n)]

    whole = stream(list(range(2 * BATCH)))
    hosts = [stream(list(range(BATCH))), stream(list(range(BATCH, 2 * BATCH)))]
    assert [a + b for a, b in zip(*hosts, strict=True)] == whole
    assert sorted(i for batch in whole for i in batch) == list(range(N_GOOD))


def test_all_undecodable_is_an_error_not_a_hang(tmp_path, tokenizer):
    with records.ShardWriter(tmp_path / records.shard_name("bad", 0, 1)) as writer:
        for i in range(8):
            writer.write(records.encode_record(b"not an image", f"caption {i}"))
    with pytest.raises(ValueError, match="no decodable image"):
        next(iter(train_dataset(make_config(tmp_path), tokenizer)))


def test_a_folder_of_webdataset_tars_names_the_conversion(tmp_path):
    """data.source 'records' on WebDataset shards said "no .arrayrecord shards" and no more."""
    from clip_jax.data.records import list_shards

    (tmp_path / "00000.tar").write_bytes(b"")
    (tmp_path / "00001.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"it holds 2 \.tar files \(WebDataset shards\?\): convert them first, "
                                                f"clip-jax data convert --format webdataset {tmp_path} --out RECORDS"):
        list_shards(str(tmp_path))
