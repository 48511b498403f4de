"""SLIP (clip_jax/methods/slip.py): its augmented views (data/augment.py), its batch against CLIP's, and the export
of a SLIP model without its head. (The method contract: tests/test_methods.py; NT-Xent: tests/test_losses.py.)"""

import colorsys

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from clip_jax.config import ConfigError, default_config, method_config, validate
from clip_jax.data.augment import colour_jitter, shift_hue, ssl_view
from clip_jax.data.pipeline import tokenizer_corpus
from clip_jax.data.tokenizer import ClipTokenizer
from clip_jax.interop import openai as oa
from clip_jax.methods import get_method

from .test_methods import VOCAB, tiny_config

RED = np.array([200, 30, 30], np.uint8)


def test_a_hue_shift_by_hand():
    """Red moved by a sixth of the colour circle is yellow, by a third green, back by a third blue; orange (hue 1/12)
    moved by a third is a green-cyan; a gray pixel stays as it is."""
    pixels = np.array([[1.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.3, 0.3, 0.3]], np.float32)
    np.testing.assert_allclose(shift_hue(pixels, 1 / 6), [[1, 1, 0], [0.5, 1, 0], [0.3, 0.3, 0.3]], atol=1e-6)
    np.testing.assert_allclose(shift_hue(pixels, 1 / 3), [[0, 1, 0], [0, 1, 0.5], [0.3, 0.3, 0.3]], atol=1e-6)
    np.testing.assert_allclose(shift_hue(pixels[:1], -1 / 3), [[0, 0, 1]], atol=1e-6)


@pytest.mark.parametrize("shift", [0.37, -0.08, 0.5, -0.5, 1.3])
def test_a_hue_shift_matches_the_standard_librarys_hsv_conversion(shift):
    """Against colorsys (Python's own RGB <-> HSV), pixel by pixel, on an image with gray pixels in it; and the
    shift keeps each pixel's max and min channel (its value and saturation) and is undone by the opposite shift."""
    image = np.random.default_rng(0).random((12, 10, 3)).astype(np.float32)
    image[0] = 0.4  # a gray row
    image[1, :, 2] = image[1, :, 0]  # ties between channels
    hsv = [colorsys.rgb_to_hsv(*p) for p in image.reshape(-1, 3).astype(np.float64)]
    want = np.array([colorsys.hsv_to_rgb((h + shift) % 1.0, s, v) for h, s, v in hsv]).reshape(image.shape)
    got = shift_hue(image, shift)
    assert got.shape == image.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-6)
    np.testing.assert_allclose(got.max(-1), image.max(-1), atol=2e-6)
    np.testing.assert_allclose(got.min(-1), image.min(-1), atol=2e-6)
    np.testing.assert_allclose(shift_hue(got, -shift), image, atol=1e-5)


def test_jitter_keeps_a_gray_image_gray_with_saturation_and_hue():
    gray = np.full((4, 4, 3), 0.5, np.float32)
    out = colour_jitter(gray, np.random.default_rng(0), brightness=0, contrast=0, saturation=0.4, hue=0.1)
    np.testing.assert_allclose(out, gray, atol=1e-6)


def test_colour_views_keep_a_uniform_colour_and_simclr_views_change_it():
    image = np.broadcast_to(RED, (48, 48, 3)).copy()
    colour = [ssl_view(image, 32, np.random.default_rng(seed), "colour") for seed in range(20)]
    simclr = [ssl_view(image, 32, np.random.default_rng(seed), "simclr") for seed in range(20)]
    assert all(v.shape == (32, 32, 3) and (v == RED).all() for v in colour)
    changed = sum(not (v == RED).all() for v in simclr)  # jitter (p 0.8) or grayscale (p 0.2) alter it
    assert changed >= 15, changed


def test_the_views_are_deterministic_per_generator():
    image = np.random.default_rng(1).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    a = ssl_view(image, 32, np.random.default_rng(7), "simclr")
    b = ssl_view(image, 32, np.random.default_rng(7), "simclr")
    np.testing.assert_array_equal(a, b)
    # a source of encoded images hands the hook the decoded PIL image (pipeline.DecodeExample): the same views
    c = ssl_view(Image.fromarray(image), 32, np.random.default_rng(7), "simclr")
    np.testing.assert_array_equal(a, c)


@pytest.fixture(scope="module")
def batches():
    """The first batch of CLIP and of SLIP on the same config and seed, and of SLIP under patch dropout."""
    out = {}
    for name in ("clip", "slip", "slip+patch_dropout"):
        config = tiny_config(name.partition("+")[0])
        config.model.vision.patch_dropout = 0.5 if "+" in name else 0.0
        tokenizer = ClipTokenizer.train(tokenizer_corpus(config, 500), VOCAB)
        method = get_method(config)
        out[name] = next(method.train_data(config, tokenizer, list(range(config.batch_size))))
    return out


def test_slip_sees_clips_batch_plus_two_different_views(batches):
    clip, slip = batches["clip"], batches["slip"]
    np.testing.assert_array_equal(slip["image"], clip["image"])  # the views draw from the generator last
    np.testing.assert_array_equal(slip["text"], clip["text"])
    views = slip["ssl_views"]
    assert views.shape == (16, 2, 32, 32, 3) and views.dtype == np.uint8
    assert all(not np.array_equal(v[0], v[1]) for v in views)


def test_patch_dropout_adds_each_examples_key_after_the_views(batches):
    slip, dropped = batches["slip"], batches["slip+patch_dropout"]
    for field in ("image", "text", "ssl_views"):  # the key draws from the generator after them
        np.testing.assert_array_equal(dropped[field], slip[field])
    keys = dropped["dropout_key"]
    assert keys.shape == (16, 2) and keys.dtype == np.uint32 and len({tuple(k) for k in keys}) == 16
    assert "dropout_key" not in slip


def test_an_unknown_augmentation_is_refused_in_one_line():
    config = default_config()
    config.method = method_config("slip", augmentation="autoaugment")
    with pytest.raises(ConfigError, match="unknown method.augmentation 'autoaugment'; choose one of simclr, colour"):
        validate(config)


@pytest.mark.parametrize("field, value, words", [
    ("ssl_dim", 0, "method.ssl_dim must be >= 1 (the head's output width), got 0"),
    ("ssl_hidden", 0, "method.ssl_hidden must be >= 1 (the head's hidden width), got 0"),
    ("ssl_temperature", 0.0, "method.ssl_temperature must be > 0 (NT-Xent divides the similarities by it), got 0.0"),
    ("ssl_temperature", -0.1, "method.ssl_temperature must be > 0 (NT-Xent divides the similarities by it), got -0.1"),
    ("ssl_scale", -1.0, "method.ssl_scale must be >= 0 (the weight of NT-Xent beside CLIP's loss), got -1.0"),
])
def test_a_head_or_loss_setting_that_cannot_train_is_refused_in_one_line(field, value, words):
    """A head of no width crashed at init; a temperature of 0 trained NaN steps; a negative weight maximised the
    self-supervised loss: each is refused when the config is read."""
    config = default_config()
    config.method = method_config("slip", **{field: value})
    with pytest.raises(ConfigError) as e:
        validate(config)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_the_export_of_a_slip_model_is_clips():
    config = tiny_config("slip")
    method = get_method(config)
    params = nn.unbox(jax.eval_shape(method.model().init, jax.random.key(0), *method.init_inputs())["params"])
    assert "ssl_head" in params
    model = config.model.to_dict()
    ours = oa.state_dict_from_params(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), dict(params)), model)
    clip_params = {k: v for k, v in params.items() if k != "ssl_head"}
    theirs = oa.state_dict_from_params(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), clip_params), model)
    assert ours.keys() == theirs.keys() and not any("ssl" in k for k in ours)
