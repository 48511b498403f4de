"""Analytic FLOPs: the published per-sample figures of REFERENCE section 7, and XLA's own count of a compiled model.

XLA's HloCostAnalysis counts 2 FLOPs per multiply-add of every dot and convolution, like the formula, but it also
counts every elementwise op (layer norms, softmax, activations, residual and bias adds, the uint8 -> float
normalisation, the final L2 norm) and the one-hot pooling contraction of the text tower, which the formula leaves
out. With a width of 256 those are about 1% of the total, so XLA's count is slightly *above* the formula's.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from clip_jax.models import flops
from clip_jax.models.clip import CLIP, CLIPConfig
from clip_jax.models.presets import model_preset
from clip_jax.models.towers import TextConfig, VisionConfig

# REFERENCE section 7: forward GFLOPs per sample at 224 px and 77 tokens: (image, text, total).
PUBLISHED = {
    "B/32": (8.82, 5.96, 14.78),
    "B/16": (35.13, 5.96, 41.09),
    "L/14": (162.03, 13.30, 175.33),
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_forward_flops_match_published_table(preset):
    cfg = CLIPConfig.from_dict(model_preset(preset))
    image, text = flops.image_forward_flops(cfg) / 1e9, flops.text_forward_flops(cfg) / 1e9
    want_image, want_text, want_total = PUBLISHED[preset]
    assert image == pytest.approx(want_image, rel=0.01)
    assert text == pytest.approx(want_text, rel=0.01)
    assert image + text == pytest.approx(want_total, rel=0.01)
    # Training is forward + backward, 3x forward.
    assert flops.train_flops_per_sample(cfg) / 1e9 == pytest.approx(3 * want_total, rel=0.01)


@pytest.mark.parametrize("preset, gflops", [("B/16", 20.2), ("L/14", 44.4)])
def test_long_text_flops_match_published(preset, gflops):
    """Long-CLIP's 248-token text tower: about 20.2 GFLOPs at width 512, 44.4 at width 768."""
    cfg = CLIPConfig.from_dict(model_preset(preset))
    assert flops.text_forward_flops(cfg, context_length=248) / 1e9 == pytest.approx(gflops, rel=0.01)


def test_peak_flops_lookup():
    assert flops.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    # the PCIe and NVL parts, whose names begin as the SXM's, got the SXM's peak: their MFU came out too low
    assert flops.peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_flops_per_device("NVIDIA H100 NVL") == 835e12
    assert flops.peak_flops_per_device("NVIDIA H200") == 989e12
    assert flops.peak_flops_per_device("TPU v5 lite") == 197e12
    assert flops.peak_flops_per_device("cpu") is None


# --- against XLA's count --------------------------------------------------------------------------------------

BATCH = 2


@pytest.fixture(scope="module")
def small_model():
    tower = dict(width=256, layers=1, heads=4, head_dim=64, mlp_dim=1024, activation="quick_gelu")
    cfg = CLIPConfig.from_dict({
        "vision": dict(tower, type="vit", patch_size=16, image_size=64),
        "text": dict(tower, type="transformer", vocab_size=1000, context_length=32),
        "embed_dim": 128,
    })
    model = CLIP(cfg)
    images = jnp.zeros((BATCH, 64, 64, 3), jnp.uint8)
    tokens = jnp.zeros((BATCH, 32), jnp.int32)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images[:1], tokens[:1])["params"])
    return cfg, model, params, images, tokens


def xla_flops(fn, *args) -> float:
    return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


def test_forward_flops_match_xla_count(small_model):
    cfg, model, params, images, tokens = small_model
    counted = xla_flops(lambda p, i, t: model.apply({"params": p}, i, t), params, images, tokens)
    analytic = BATCH * (flops.image_forward_flops(cfg) + flops.text_forward_flops(cfg))
    assert 1.0 <= counted / analytic < 1.03


def test_patch_dropout_forward_flops_match_xla_count(small_model):
    """Half the 16 patches kept: the blocks see 9 tokens, the patch embedding all 16."""
    cfg, _, params, images, _ = small_model
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, patch_dropout=0.5))
    model = CLIP(cfg)
    counted = xla_flops(lambda p, i, k: model.apply({"params": p}, i, dropout_rng=k, method=CLIP.encode_image),
                        params, images, jax.random.key(0))
    analytic = BATCH * flops.image_forward_flops(cfg, training=True)
    assert 1.0 <= counted / analytic < 1.03
    assert counted < 0.7 * BATCH * flops.image_forward_flops(cfg)  # against every patch: far fewer


def test_train_flops_match_xla_count_of_a_gradient(small_model):
    """Forward + backward of a contrastive-style loss: about 3x forward. XLA's count is a little under the
    convention here: no gradient is computed for the input pixels (the patch embedding's input gradient) nor as a
    matmul for the token embedding table; the elementwise ops partly compensate."""
    cfg, model, params, images, tokens = small_model

    def loss(p, i, t):
        out = model.apply({"params": p}, i, t)
        return jnp.sum(out["image"] @ out["text"].T)

    counted = xla_flops(jax.value_and_grad(loss), params, images, tokens)
    analytic = BATCH * flops.train_flops_per_sample(cfg)
    assert 0.97 < counted / analytic < 1.03


def test_audio_forward_flops_match_xla_count():
    """The audio tower (AudioCLIP): XLA also counts the FFT and the elementwise ops of the log-mel features, which
    the formula leaves out (the mel filterbank is a matmul and counted): a few percent at this width."""
    tower = dict(width=256, layers=1, heads=4, head_dim=64, mlp_dim=1024, activation="quick_gelu")
    cfg = CLIPConfig.from_dict({
        "vision": dict(tower, type="vit", patch_size=16, image_size=32),
        "text": dict(tower, type="transformer", vocab_size=100, context_length=8),
        "audio": dict(tower, type="spectrogram_vit", num_samples=8000, n_mels=64, patch_time=8, patch_freq=8),
        "embed_dim": 128,
    })
    model = CLIP(cfg)
    sounds = jnp.zeros((BATCH, 8000), jnp.float32)
    params = nn.unbox(jax.eval_shape(lambda r: model.init(r, sounds[:1], method=CLIP.encode_audio),
                                     jax.random.key(0))["params"])
    counted = xla_flops(lambda p, s: model.apply({"params": p}, s, method=CLIP.encode_audio), params, sounds)
    assert 1.0 <= counted / (BATCH * flops.audio_forward_flops(cfg)) < 1.05


def test_groupvit_forward_flops_match_xla_count():
    """GroupViT's tower, grouping blocks included: XLA's count of the evaluation forward against the formula."""
    from clip_jax.methods.groupvit import GroupViTCLIP, GroupViTConfig

    cfg = CLIPConfig(vision=VisionConfig(width=64, layers=3, heads=2, head_dim=32, mlp_dim=256, image_size=64,
                                         patch_size=8),
                     text=TextConfig(width=32, layers=1, heads=2, head_dim=16, mlp_dim=64, context_length=8,
                                     vocab_size=100), embed_dim=32)
    hparams = GroupViTConfig(stage_depths=(1, 1, 1), num_group_tokens=(16, 8, 0), num_output_groups=(16, 8))
    model = GroupViTCLIP(cfg, hparams)
    images = jax.ShapeDtypeStruct((BATCH, 64, 64, 3), jnp.float32)  # shapes only: nothing is computed
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3), jnp.uint8),
                            jnp.zeros((1, 8), jnp.int32))["params"]
    counted = xla_flops(lambda p, i: model.apply({"params": p}, i, method=GroupViTCLIP.encode_image), params, images)
    analytic = BATCH * flops.groupvit_forward_flops(cfg, (1, 1, 1), (16, 8, 0), (16, 8))
    assert 1.0 <= counted / analytic < 1.05
