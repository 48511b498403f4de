"""The grain training pipeline: deterministic given the config, batches in the documented layout (and equal to
the source's own examples, numbered by their stream positions, captions cut to the context marked), and an
iterator's state resumes the stream exactly."""

import json

import numpy as np
import pytest

from clip_jax.config import default_config
from clip_jax.data.pipeline import MARKS, STATS, TrainExample, tokenizer_corpus, train_iterator
from clip_jax.data.shapes import ShapesConfig, ShapesDataset
from clip_jax.data.tokenizer import ClipTokenizer
from clip_jax.models.presets import model_preset

BATCH, IMAGE, CONTEXT, VOCAB = 8, 32, 24, 600


def make_config(seed=0, augment=True, long_caption_prob=0.25):
    config = default_config()
    config.seed = seed
    config.batch_size = BATCH
    config.model = model_preset("tiny", vocab_size=VOCAB, context_length=CONTEXT)
    config.model.vision.image_size = IMAGE
    config.data.augment = augment
    config.data.long_caption_prob = long_caption_prob
    config.data.tokenizer_vocab_size = VOCAB
    return config


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer.train(tokenizer_corpus(make_config(), n=500), VOCAB)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert a.keys() == b.keys() and a[STATS].keys() == b[STATS].keys()
    for key in a.keys() - {STATS}:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for key in a[STATS]:
        np.testing.assert_array_equal(a[STATS][key], b[STATS][key], err_msg=key)


def test_same_config_same_batches_other_seed_other_batches(tokenizer):
    first = take(train_iterator(make_config(), tokenizer), 2)
    second = take(train_iterator(make_config(), tokenizer), 2)
    for a, b in zip(first, second, strict=True):
        assert_batches_equal(a, b)
    other = next(train_iterator(make_config(seed=1), tokenizer))
    assert not np.array_equal(other["image"], first[0]["image"])
    # Consecutive batches are different examples, not one batch repeated.
    assert not np.array_equal(first[0]["image"], first[1]["image"])


def test_batch_layout(tokenizer):
    batch = next(train_iterator(make_config(), tokenizer))
    assert set(batch) == {"image", "text", STATS}
    assert set(batch[STATS]) == {"example_index", *MARKS}
    for values in batch[STATS].values():
        assert values.shape == (BATCH,) and values.dtype.kind == "i"
    assert batch["image"].shape == (BATCH, IMAGE, IMAGE, 3) and batch["image"].dtype == np.uint8
    assert batch["text"].shape == (BATCH, CONTEXT) and batch["text"].dtype == np.int32
    text = batch["text"]
    assert (text[:, 0] == tokenizer.sot_id).all()
    eot = text.argmax(axis=1)
    # Exactly one EOT per row, at the argmax position (where the text tower pools), zero padding after it.
    assert (text[np.arange(BATCH), eot] == tokenizer.eot_id).all()
    assert ((text == tokenizer.eot_id).sum(axis=1) == 1).all()
    after_eot = np.arange(CONTEXT)[None, :] > eot[:, None]
    assert (text[after_eot] == 0).all()
    assert (text[~after_eot] > 0).all()
    assert (text < VOCAB).all()


@pytest.mark.parametrize("caption", ["short_caption", "long_caption"])
def test_batches_are_the_source_examples_in_order(tokenizer, caption):
    """Without augmentation, batch k holds examples k*B ... k*B+B-1 of the train split (their stream positions),
    with their short (or long) captions tokenized: nothing dropped, reordered or duplicated. Procedural images are
    RGB at the model's size (never converted or upscaled); a caption is marked truncated where it has more BPE
    tokens than fit between SOT and EOT (the long ones, some of them, at 24 tokens)."""
    config = make_config(augment=False, long_caption_prob=float(caption == "long_caption"))
    source = ShapesDataset(ShapesConfig(image_size=IMAGE, seed=config.seed), "train")
    truncated = []
    for k, batch in enumerate(take(train_iterator(config, tokenizer), 2)):
        items = [source[k * BATCH + i] for i in range(BATCH)]
        np.testing.assert_array_equal(batch["image"], np.stack([it["image"] for it in items]))
        np.testing.assert_array_equal(batch["text"], tokenizer([it[caption] for it in items], CONTEXT))
        stats = batch[STATS]
        assert stats["example_index"].tolist() == list(range(k * BATCH, (k + 1) * BATCH))
        assert not stats["converted"].any() and not stats["upscaled"].any() and not stats["bad_utf8"].any()
        want = [len(tokenizer.encode(it[caption])) > CONTEXT - 2 for it in items]
        assert stats["truncated_caption"].tolist() == want
        truncated += want
    assert (caption == "long_caption") == any(truncated)


@pytest.mark.parametrize("k", [1, 3])
def test_get_state_set_state_resumes_exactly(tokenizer, k):
    uninterrupted = take(train_iterator(make_config(), tokenizer), k + 2)

    iterator = train_iterator(make_config(), tokenizer)
    take(iterator, k)
    # Checkpoints store the state as JSON: go through it.
    state = json.loads(json.dumps(iterator.get_state()))
    take(iterator, 2)  # the first iterator moves on (and prefetches) after the state was taken

    restored = train_iterator(make_config(), tokenizer)
    restored.set_state(state)
    for want, got in zip(uninterrupted[k:], take(restored, 2), strict=True):
        assert_batches_equal(want, got)


def test_worker_processes_give_the_same_batches(tokenizer):
    """data.workers > 0 decodes in grain worker processes (which read absl flags: the pipeline must mark them
    parsed); the stream is the same as in-process."""
    config = make_config()
    want = take(train_iterator(config, tokenizer), 2)
    config.data.workers = 1
    got = take(train_iterator(config, tokenizer), 2)
    for a, b in zip(got, want, strict=True):
        assert_batches_equal(a, b)


def _is_gray(image: np.ndarray) -> bool:
    return bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())


@pytest.mark.parametrize("kind", ["shape", "colour"])
def test_grayscale_shape_prob_greys_that_share_of_shape_only_captions(kind):
    """`data.grayscale_shape_prob`: an image whose caption names only the shape is grayed with that probability
    (a binomial bound over 400 draws); one whose caption names the colour never is. At 0 and 1 no extra number is
    drawn, so the generator ends where the switch this replaced left it."""
    red = np.zeros((IMAGE, IMAGE, 3), np.uint8)
    red[..., 0] = 200
    element = {"image": red, "short_caption": "a red cross.", "partial_caption": "a cross.",
               "partial_caption_kind": kind}
    grays, ends = {}, {}
    for prob in (0.0, 0.5, 1.0):
        example = TrainExample(IMAGE, augment=False, crop_scale=(1.0, 1.0), long_caption_prob=0.0,
                               partial_caption_prob=1.0, grayscale_shape_prob=prob)
        rng = np.random.default_rng(0)
        outs = [example.random_map(dict(element), rng) for _ in range(400)]
        assert all(out["caption"] == "a cross." for out in outs)
        grays[prob] = sum(_is_gray(out["image"]) for out in outs)
        ends[prob] = rng.random()
    if kind == "colour":
        assert grays == {0.0: 0, 0.5: 0, 1.0: 0}
    else:
        assert grays[0.0] == 0 and grays[1.0] == 400
        assert 160 <= grays[0.5] <= 240  # mean 200, sd 10
        assert ends[0.0] == ends[1.0] != ends[0.5]
