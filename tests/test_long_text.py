"""Long-text evaluation data: Urban-1k-layout and JSON folders (bad images skipped and counted), shapes captions over
77 tokens, hard pairs that differ in one object described after token 77, and the pair scores on hand-made cases."""

import json

import numpy as np
import pytest
from PIL import Image

from clip_jax.config import default_config
from clip_jax.data.images import load_image
from clip_jax.data.pipeline import tokenizer_corpus
from clip_jax.data.shapes import COLOURS
from clip_jax.data.tokenizer import ClipTokenizer
from clip_jax.evaluate.long_text import hard_pairs, hard_pairs_accuracy, load_long_text_set, shapes_long_captions

SIZE = 48


@pytest.fixture(scope="module")
def tokenizer():
    config = default_config()
    config.model.vision.image_size = 32
    return ClipTokenizer.train(tokenizer_corpus(config, n=300), 600)


def test_urban1k_layout_and_json(tmp_path):
    (tmp_path / "image").mkdir()
    (tmp_path / "caption").mkdir()
    for i in (1, 2):
        Image.new("RGB", (60, 40), (100 * i, 50, 0)).save(tmp_path / "image" / f"{i}.jpg")
        (tmp_path / "caption" / f"{i}.txt").write_text(f"caption {i}. a long one.\nsecond line, unused\n")
    (tmp_path / "caption" / "3.txt").write_text("caption without an image\n")
    (tmp_path / "image" / "4.jpg").write_bytes(b"corrupt")
    (tmp_path / "caption" / "4.txt").write_text("caption of a corrupt image\n")
    images, captions, image_of_text, skipped = load_long_text_set(tmp_path, SIZE)
    assert captions == ["caption 1. a long one.", "caption 2. a long one."] and skipped == 2
    assert image_of_text.tolist() == [0, 1]
    np.testing.assert_array_equal(images, np.stack([load_image(tmp_path / "image" / f"{i}.jpg", SIZE) for i in (1, 2)]))

    (tmp_path / "set.json").write_text(json.dumps({"image/2.jpg": "two", "image/1.jpg": "one", "image/4.jpg": "x"}))
    images, captions, image_of_text, skipped = load_long_text_set(tmp_path / "set.json", SIZE)
    assert captions == ["two", "one"] and image_of_text.tolist() == [0, 1] and skipped == 1
    np.testing.assert_array_equal(images[0], load_image(tmp_path / "image" / "2.jpg", SIZE))
    with pytest.raises(FileNotFoundError, match="Urban-1k layout"):
        load_long_text_set(tmp_path / "image", SIZE)


def test_a_caption_table_with_several_captions_of_an_image(tmp_path):
    """A caption table (as training reads one) evaluates retrieval: rows may share an image (COCO's five captions),
    which is read once; a corrupt image costs its captions only."""
    from clip_jax.evaluate.retrieval import retrieval_recall

    for name, colour in (("a.jpg", (200, 0, 0)), ("b.jpg", (0, 200, 0))):
        Image.new("RGB", (60, 40), colour).save(tmp_path / name)
    (tmp_path / "c.jpg").write_bytes(b"corrupt")
    (tmp_path / "set.csv").write_text('image,caption\na.jpg,a red one\nb.jpg,"a green one,\n  square"\n'
                                      "c.jpg,lost\na.jpg,red again\n")
    images, captions, image_of_text, skipped = load_long_text_set(tmp_path / "set.csv", SIZE)
    assert captions == ["a red one", "a green one, square", "red again"] and skipped == 1
    assert image_of_text.tolist() == [0, 1, 0] and len(images) == 2
    np.testing.assert_array_equal(images[1], load_image(tmp_path / "b.jpg", SIZE))
    # image paths relative to an image_root, as data.image_root for training (a table kept apart from its images)
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "val.csv").write_text("image,caption\na.jpg,a red one\nb.jpg,a green one\n")
    rooted, rooted_captions, _, _ = load_long_text_set(tmp_path / "tables" / "val.csv", SIZE, image_root=str(tmp_path))
    np.testing.assert_array_equal(rooted, images)
    assert rooted_captions == ["a red one", "a green one"]
    with pytest.raises(ValueError, match="image_root is for a caption table's image paths"):
        load_long_text_set(tmp_path / "set.json", SIZE, image_root=str(tmp_path))
    # R@1 with embeddings that put "red again" nearest b.jpg: an image's row of captions is one image, not two
    image_embeds, text_embeds = np.eye(2, dtype=np.float32), np.asarray([[1, 0], [0, 1], [0.6, 0.8]], np.float32)
    recall = retrieval_recall(image_embeds, text_embeds, image_of_text, texts=captions)
    assert recall["t2i_r1"] == pytest.approx(2 / 3) and recall["i2t_r1"] == 1.0


@pytest.mark.parametrize("case, content, words", [
    ("empty caption", None, "its first line, the caption, is empty"),
    ("truncated JSON", '{"a.jpg": "one', "is not a JSON file"),
    ("ShareGPT4V list", '[{"image": "a.jpg", "conversations": []}]', "holds a JSON list, not an object"),
    ("caption not a text", '{"a.jpg": 5}', "the caption of 'a.jpg' is 5, not a text"),
    ("names from elsewhere", '{"data/a.jpg": "one"}', "no readable image-caption pair (the images are looked for in"),
    ("table row without a caption", "image,caption\na.jpg,one\na.jpg,\n",
     "set.csv: row 2 (image a.jpg) has no caption; give each row"),
    ("table without a caption column", "image,text\na.jpg,one\n", "no column 'caption' in the header"),
    ("table of no row", "image,caption\n", "holds no row"),
])
def test_a_long_text_set_that_cannot_be_read_is_one_line_before_training(tmp_path, case, content, words):
    """Each was an "unexpected error" (IndexError, AttributeError, JSONDecodeError, TypeError), and the entry was
    read only when it evaluated: a training run lost its final evaluation after its last step."""
    from clip_jax.config import check_input_paths, load_config
    from clip_jax.errors import ConfigError

    Image.new("RGB", (60, 40)).save(tmp_path / "a.jpg")
    if content is None:  # an Urban-1k folder whose caption file is empty
        path = tmp_path / "urban"
        (path / "image").mkdir(parents=True)
        (path / "caption").mkdir()
        (path / "caption" / "a.txt").write_text("\n")
    else:
        path = tmp_path / ("set.csv" if case.startswith("table") else "set.json")
        path.write_text(content)
    config = load_config("configs/demo.py", [f"--config.evals.long={{'type': 'long_text_set', 'path': '{path}'}}"])
    if case == "names from elsewhere":  # the pairs read; the images only when it evaluates
        check_input_paths(config)
        with pytest.raises(ValueError) as error:
            load_long_text_set(path, SIZE)
        assert words in str(error.value) and f"{tmp_path}, the file's folder" in str(error.value)
        return
    with pytest.raises(ConfigError) as error:
        check_input_paths(config)
    assert str(error.value).startswith("evals.long.path: ") and words in str(error.value), error.value
    assert "\n" not in str(error.value)


def test_shapes_long_captions_exceed_77_tokens(tokenizer):
    images, captions = shapes_long_captions(SIZE, 0, 20, tokenizer)
    assert len(captions) == len(images) >= 18 and images.shape[1:] == (SIZE, SIZE, 3)
    assert min(len(tokenizer.encode(c)) + 2 for c in captions) > 77


def test_hard_pairs_differ_in_one_object_after_token_77(tokenizer):
    images, captions = hard_pairs(SIZE, 0, 6, tokenizer)
    assert images.shape == (12, SIZE, SIZE, 3) and len(captions) == 12
    for k in range(6):
        a, b = captions[2 * k].split(), captions[2 * k + 1].split()
        # the captions differ in one word, a colour (the recoloured object's) ...
        diff = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
        assert len(diff) == 1 and diff[0][0].strip(".,;") in COLOURS and diff[0][1].strip(".,;") in COLOURS
        # ... which starts after token 77: same 77-token input, different 248-token input
        short, full = tokenizer(captions[2 * k : 2 * k + 2], 77), tokenizer(captions[2 * k : 2 * k + 2], 248)
        assert (short[0] == short[1]).all() and (full[0] != full[1]).any()
        # the images differ inside one cell of the 3x3 grid: one object
        rows, cols = np.nonzero((images[2 * k] != images[2 * k + 1]).any(-1))
        assert len(rows) and rows.max() // (SIZE / 3) == rows.min() // (SIZE / 3)
        assert cols.max() // (SIZE / 3) == cols.min() // (SIZE / 3)


def test_hard_pairs_accuracy_hand_computed():
    e = np.eye(4, dtype=np.float32)
    # pair 0: each image closest to its own caption; pair 1: both images prefer caption 2 (the first of the pair)
    images = np.stack([e[0], e[1], e[2], e[2] * 0.6 + e[3] * 0.4])
    texts = np.stack([e[0] * 0.9 + e[1] * 0.1, e[1], e[2], e[3] * 0.5 + e[2] * 0.5])
    assert hard_pairs_accuracy(images, texts) == {"pairs": 0.5, "images": 0.75}
    # a model blind to the difference in the text: ties everywhere
    assert hard_pairs_accuracy(images, np.repeat(texts[::2], 2, axis=0)) == {"pairs": 0.0, "images": 0.5}
