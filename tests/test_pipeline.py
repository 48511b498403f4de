"""The grain training pipeline: deterministic given the config, batches in the documented layout (and equal to
the source's own examples, numbered by their stream positions, captions cut to the context marked), and an
iterator's state resumes the stream exactly."""

import json
import multiprocessing
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from clip_jax.config import default_config
from clip_jax.data.pipeline import (
    MARKS,
    NEGATIVE_CAPTION,
    STATS,
    Captions,
    TextField,
    TrainExample,
    tokenizer_corpus,
    train_iterator,
)
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


def test_worker_processes_give_the_same_batches_and_outlive_the_stop_signals(tokenizer):
    """data.workers > 0 decodes in grain worker processes (which read absl flags: the pipeline must mark them
    parsed); the stream is the same as in-process. SIGTERM and SIGINT, which a scheduler or a terminal sends the
    whole process group, leave the workers serving: the trainer answers them with a checkpoint, which needs the
    batches (a worker they killed made the next batch an error)."""
    config = make_config()
    want = take(train_iterator(config, tokenizer), 4)
    config.data.workers = 1
    before = set(multiprocessing.active_children())
    iterator = train_iterator(config, tokenizer)
    got = take(iterator, 2)
    workers = [p for p in multiprocessing.active_children() if p not in before]
    assert workers
    for worker in workers:
        os.kill(worker.pid, signal.SIGTERM)
        os.kill(worker.pid, signal.SIGINT)
    time.sleep(1)
    got += take(iterator, 2)
    assert all(worker.is_alive() for worker in workers)
    for a, b in zip(got, want, strict=True):
        assert_batches_equal(a, b)
    iterator.close()


def test_a_worker_exits_when_the_trainer_ends_without_closing_its_data():
    """A trainer that ends at once (a second Ctrl-C, or one while compiling: os._exit) does not close its data
    iterator; its workers, which ignore SIGTERM and SIGINT, must not live on as orphans (they hold the dataset's
    memory and a CPU each)."""
    script = (
        "import multiprocessing, os\n"
        "from clip_jax.data.pipeline import tokenizer_corpus, train_iterator\n"
        "from clip_jax.data.tokenizer import ClipTokenizer\n"
        "from test_pipeline import VOCAB, make_config\n"
        "if __name__ == '__main__':\n"
        "    config = make_config()\n"
        "    config.data.workers = 1\n"
        "    iterator = train_iterator(config, ClipTokenizer.train(tokenizer_corpus(config, n=200), VOCAB))\n"
        "    next(iterator)\n"
        "    print(*[p.pid for p in multiprocessing.active_children()], flush=True)\n"
        "    os._exit(130)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(pathlib.Path(__file__).parents[1]), str(pathlib.Path(__file__).parent)])}
    ended = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert ended.returncode == 130, ended.stderr[-2000:]
    workers = [int(pid) for pid in ended.stdout.split()]
    assert workers

    def running(pid: int) -> bool:  # (an exited orphan that init has not reaped yet is a zombie: gone)
        try:
            return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.time() + 20
    while any(map(running, workers)) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(map(running, workers))


def _is_gray(image: np.ndarray) -> bool:
    return bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())


def _is_shuffled(image: np.ndarray, original: np.ndarray) -> bool:
    """The same pixels (as a multiset) in another order."""
    same_pixels = np.array_equal(np.sort(image.reshape(-1, 3).view("V3"), axis=0),
                                 np.sort(original.reshape(-1, 3).view("V3"), axis=0))
    return same_pixels and not np.array_equal(image, original)


@pytest.mark.parametrize("kind", ["shape", "colour"])
def test_partial_caption_images_lose_what_the_caption_does_not_name(kind):
    """`data.grayscale_shape_prob`: an image whose caption names only the shape is grayed with that probability;
    `data.shuffled_colour_prob`: one whose caption names only the colour has its pixels shuffled with that
    probability (binomial bounds over 400 draws). Neither touches the other kind's images."""
    cross = np.zeros((IMAGE, IMAGE, 3), np.uint8)
    cross[IMAGE // 2 - 2:IMAGE // 2 + 2, :, 0] = 200  # a red cross on black: a shape that shuffling destroys
    cross[:, IMAGE // 2 - 2:IMAGE // 2 + 2, 0] = 200
    partial = {"shape": "a cross.", "colour": "a red shape."}[kind]
    element = {"image": cross, "short_caption": "a red cross.", "partial_caption": partial,
               "partial_caption_kind": kind}
    changed, ends = {}, {}
    for knob in ("grayscale_shape_prob", "shuffled_colour_prob"):
        for prob in (0.0, 0.5, 1.0):
            example = TrainExample(IMAGE, augment=False, crop_scale=(1.0, 1.0), long_caption_prob=0.0,
                                   partial_caption_prob=1.0, **{knob: prob})
            rng = np.random.default_rng(0)
            outs = [example.random_map(dict(element), rng) for _ in range(400)]
            assert all(out["caption"] == partial for out in outs)
            changed[knob, prob] = sum(_is_gray(out["image"]) if knob == "grayscale_shape_prob"
                                      else _is_shuffled(out["image"], cross) for out in outs)
            unchanged = sum(np.array_equal(out["image"], cross) for out in outs)
            assert changed[knob, prob] + unchanged == 400, (knob, prob)  # nothing but the one change
            ends[knob, prob] = rng.random()
    acting = {"shape": "grayscale_shape_prob", "colour": "shuffled_colour_prob"}[kind]
    for knob in ("grayscale_shape_prob", "shuffled_colour_prob"):
        if knob != acting:
            assert [changed[knob, prob] for prob in (0.0, 0.5, 1.0)] == [0, 0, 0]
    assert changed[acting, 0.0] == 0 and changed[acting, 1.0] == 400
    assert 160 <= changed[acting, 0.5] <= 240  # mean 200, sd 10
    if kind == "shape":  # graying draws nothing at 0 and 1, so the stream is the switch's it replaced (shuffling draws)
        assert ends[acting, 0.0] == ends[acting, 1.0] != ends[acting, 0.5]


def test_the_negative_is_the_picked_captions_and_only_a_method_that_asks_gets_it(tokenizer):
    """data.negative_captions: the example carries the negative of the caption it trains on, the batch its tokens
    where the method's captions name them (method negclip's), and otherwise nothing changes."""
    example = TrainExample(IMAGE, augment=False, crop_scale=(1.0, 1.0), long_caption_prob=0.3,
                           partial_caption_prob=0.3)
    element = {"image": np.zeros((IMAGE, IMAGE, 3), np.uint8), "partial_caption_kind": "colour",
               **{f"{k}_caption": f"{k}." for k in ("short", "long", "partial")},
               **{f"{k}_caption_negative": f"not {k}." for k in ("short", "long", "partial")}}
    rng = np.random.default_rng(0)
    outs = [example.random_map(dict(element), rng) for _ in range(200)]
    assert all(out[NEGATIVE_CAPTION] == "not " + out["caption"] for out in outs)
    assert {out["caption"] for out in outs} == {"short.", "long.", "partial."}
    assert NEGATIVE_CAPTION not in example.random_map({"image": element["image"], "caption": "a."}, rng)

    config = make_config(long_caption_prob=0.4)
    config.data.partial_caption_prob = 0.3
    plain = next(train_iterator(config, tokenizer))
    config.data.negative_captions = True
    dropped = next(train_iterator(config, tokenizer))
    assert_batches_equal(dropped, plain)  # a method that does not ask for them: the batch it had
    fields = {"text": TextField("caption", CONTEXT), "negative_text": TextField(NEGATIVE_CAPTION, CONTEXT)}
    asked = next(train_iterator(config, tokenizer, captions=Captions(fields)))
    np.testing.assert_array_equal(asked["text"], plain["text"])
    assert asked["negative_text"].shape == plain["text"].shape
    # a word replaced: other tokens in every row but one at most (a long caption cut before the replaced word)
    assert (asked["negative_text"] != asked["text"]).any(1).sum() >= BATCH - 1


def _jitter_outputs(image: np.ndarray, jitter, prob: float, n: int) -> tuple[list[dict], list[float]]:
    """`n` training examples of one image with `data.colour_jitter` and its probability, each with its own
    generator as in the pipeline, and each generator's next number after its example (what a method's fields
    would draw next)."""
    example = TrainExample(IMAGE, augment=False, crop_scale=(1.0, 1.0), long_caption_prob=0.5,
                           colour_jitter=jitter, colour_jitter_prob=prob)
    element = {"image": image, "short_caption": "a red cross.", "long_caption": "a long one."}
    outs, ends = [], []
    for i in range(n):
        rng = np.random.default_rng(i)
        outs.append(example.random_map(dict(element), rng))
        ends.append(rng.random())
    return outs, ends


def _mid_image(seed: int = 0) -> np.ndarray:
    # Channels in 100-160: no factor in [0.5, 1.5] of brightness or saturation takes a pixel out of 0-255, so
    # no clipping spoils the invariants below.
    return np.random.default_rng(seed).integers(100, 161, (IMAGE, IMAGE, 3)).astype(np.uint8)


def test_colour_jitter_off_leaves_images_and_the_stream_unchanged():
    """All strengths 0, or probability 0: the image as it was and no number drawn, so every earlier recipe's
    examples are unchanged. Without a crop or a partial caption an example draws one number, the caption's: each
    generator then goes on with its second."""
    image = _mid_image()
    plain, plain_end = _jitter_outputs(image, (0.0, 0.0, 0.0, 0.0), 0.8, 50)
    assert plain_end == [np.random.default_rng(i).random(2)[1] for i in range(50)]
    for jitter, prob in (((0.4, 0.4, 0.4, 0.1), 0.0), ((0.0, 0.0, 0.0, 0.0), 1.0)):
        outs, end = _jitter_outputs(image, jitter, prob, 50)
        assert end == plain_end
        for a, b in zip(outs, plain, strict=True):
            assert a["caption"] == b["caption"]
            np.testing.assert_array_equal(a["image"], image)
            np.testing.assert_array_equal(b["image"], image)


def test_colour_jitter_brightness_scales_an_image_by_one_factor_and_keeps_its_caption():
    """Brightness alone multiplies every pixel of an image by one factor from [0.5, 1.5] (hand-checked: the
    output is the rounded product, within 1 for the factor's estimate), a different factor per example; the
    caption is drawn before the jitter, so it is the caption the example has without it."""
    image = _mid_image()
    outs, _ = _jitter_outputs(image, (0.5, 0.0, 0.0, 0.0), 1.0, 40)
    plain, _ = _jitter_outputs(image, (0.0, 0.0, 0.0, 0.0), 1.0, 40)
    factors = []
    for out, without in zip(outs, plain, strict=True):
        assert out["caption"] == without["caption"] and out["image"].dtype == np.uint8
        factor = out["image"].astype(np.float64).sum() / image.astype(np.float64).sum()
        assert 0.5 - 0.01 <= factor <= 1.5 + 0.01
        np.testing.assert_allclose(out["image"], image * factor, atol=1.0)
        factors.append(factor)
    assert np.ptp(factors) > 0.5  # 40 uniform draws over a range of 1 spread wide


def test_colour_jitter_saturation_keeps_each_pixels_luma():
    """Saturation blends each pixel with its own gray (the luma), so the luma is unchanged while the colours move:
    an invariant independent of how the factor is drawn."""
    image = _mid_image(1)
    luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    outs, _ = _jitter_outputs(image, (0.0, 0.0, 0.5, 0.0), 1.0, 20)
    changed = 0
    for out in outs:
        np.testing.assert_allclose(out["image"].astype(np.float64) @ [0.299, 0.587, 0.114], luma, atol=1.0)
        changed += int(np.abs(out["image"].astype(int) - image).max() > 2)
    assert changed >= 15


def test_colour_jitter_prob_jitters_that_share_of_images():
    """`data.colour_jitter_prob`: a binomial bound over 400 examples (mean 200, sd 10)."""
    image = _mid_image(2)
    outs, _ = _jitter_outputs(image, (0.4, 0.4, 0.4, 0.0), 0.5, 400)
    jittered = sum(not np.array_equal(out["image"], image) for out in outs)
    assert 160 <= jittered <= 240


def test_the_training_stream_applies_data_colour_jitter(tokenizer):
    """Through train_iterator: the same examples and captions, other pixels."""
    config = make_config()
    plain = next(train_iterator(config, tokenizer))
    config.data.colour_jitter = (0.4, 0.4, 0.4, 0.0)
    config.data.colour_jitter_prob = 1.0
    jittered = next(train_iterator(config, tokenizer))
    np.testing.assert_array_equal(jittered["text"], plain["text"])
    different = [not np.array_equal(a, b) for a, b in zip(jittered["image"], plain["image"], strict=True)]
    assert sum(different) >= BATCH - 1
