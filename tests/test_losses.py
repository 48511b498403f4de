"""The core's proof: every sharded loss equals the single-device global-batch computation, value and gradients,
on meshes 8x1x1, 4x2x1 and 2x2x2 of fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax import losses
from clip_jax.sharding import batch_sharding, make_mesh, replicated

GLOBAL_BATCH, DIM = 16, 8


def reference_clip(image, text, scale, keys=None, label_smoothing=0.0):
    """Dense textbook InfoNCE on the whole batch: no sharding, no gathering."""
    n = image.shape[0]
    logits = scale * image @ text.T
    if keys is None:
        targets = jnp.eye(n)
    else:
        same = (keys[:, None] == keys[None, :]).astype(jnp.float32)
        targets = same / same.sum(1, keepdims=True)
    targets = targets * (1 - label_smoothing) + label_smoothing / n
    loss_i = -(targets * jax.nn.log_softmax(logits, axis=1)).sum(1).mean()
    loss_t = -(targets * jax.nn.log_softmax(logits.T, axis=1)).sum(1).mean()
    return (loss_i + loss_t) / 2


def reference_siglip(image, text, scale, bias, keys=None):
    n = image.shape[0]
    z = 2 * jnp.eye(n) - 1 if keys is None else jnp.where(keys[:, None] == keys[None, :], 1.0, -1.0)
    logits = scale * image @ text.T + bias
    return -jax.nn.log_sigmoid(z * logits).sum() / n


def make_inputs(seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(GLOBAL_BATCH, DIM)).astype(np.float32)
    text = rng.normal(size=(GLOBAL_BATCH, DIM)).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    # Repeated captions (keys 0..5): the multi-positive forms must use them.
    keys = rng.integers(0, 6, size=GLOBAL_BATCH).astype(np.uint32)
    return image, text, np.float32(7.5), np.float32(-2.0), keys


CASES = {
    "clip": (dict(name="clip"), lambda i, t, s, b, k: reference_clip(i, t, s)),
    "clip_multi_smooth": (
        dict(name="clip", multi_positive=True, label_smoothing=0.1),
        lambda i, t, s, b, k: reference_clip(i, t, s, k, 0.1),
    ),
    "siglip": (dict(name="siglip"), lambda i, t, s, b, k: reference_siglip(i, t, s, b)),
    "siglip_multi": (dict(name="siglip", multi_positive=True), lambda i, t, s, b, k: reference_siglip(i, t, s, b, k)),
    "siglip_ring": (dict(name="siglip_ring"), lambda i, t, s, b, k: reference_siglip(i, t, s, b)),
    "siglip_ring_multi": (
        dict(name="siglip_ring", multi_positive=True),
        lambda i, t, s, b, k: reference_siglip(i, t, s, b, k),
    ),
}


@pytest.mark.parametrize("mesh_sizes", [(8, 1, 1), (4, 2, 1), (2, 2, 2)], ids=["8x1x1", "4x2x1", "2x2x2"])
@pytest.mark.parametrize("case", list(CASES))
def test_sharded_loss_equals_global_computation(case, mesh_sizes):
    assert jax.device_count() == 8
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_sizes, strict=True)))
    spec, reference = CASES[case]
    spec = dict(spec)
    loss_fn = losses.shard_loss(losses.get_loss(spec.pop("name"), **spec), mesh)
    image, text, scale, bias, keys = make_inputs()

    def sharded(image, text, scale, bias):
        outputs = {"image": image, "text": text, "logit_scale": scale, "logit_bias": bias, "caption_key": keys_g}
        return loss_fn(outputs)[0]

    keys_g = jax.device_put(keys, batch_sharding(mesh))
    args = (
        jax.device_put(image, batch_sharding(mesh)),
        jax.device_put(text, batch_sharding(mesh)),
        jax.device_put(scale, replicated(mesh)),
        jax.device_put(bias, replicated(mesh)),
    )
    got, got_grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2, 3)))(*args)
    want, want_grads = jax.value_and_grad(
        lambda i, t, s, b: reference(i, t, s, b, jnp.asarray(keys)), argnums=(0, 1, 2, 3)
    )(image, text, scale, bias)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for g, w, name in zip(got_grads, want_grads, ("image", "text", "scale", "bias"), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6, err_msg=name)


def test_multi_positive_differs_from_one_hot_when_captions_repeat():
    # Guards the test above against a vacuous pass: with repeated keys the two targets must give other losses.
    image, text, scale, _, keys = make_inputs()
    assert len(set(keys.tolist())) < GLOBAL_BATCH
    assert abs(float(reference_clip(image, text, scale)) - float(reference_clip(image, text, scale, keys))) > 1e-3


def test_caption_key_identifies_equal_rows():
    tokens = jnp.array([[1, 5, 9, 0], [1, 5, 9, 0], [1, 9, 5, 0], [1, 5, 9, 2]], jnp.int32)
    k = np.asarray(losses.caption_key(tokens))
    assert k[0] == k[1] and len({k[0], k[2], k[3]}) == 3


def test_unknown_loss_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown loss 'clipp'"):
        losses.get_loss("clipp")
