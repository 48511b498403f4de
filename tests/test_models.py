"""Model variants compute the same function: scanned vs unrolled layers, every remat policy, token embeddings in
place of ids; bf16 compute stays close to fp32."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.models.clip import CLIP, CLIPConfig
from clip_jax.models.layers import REMAT_POLICIES

from .test_train_step import tiny_model_dict


def base_config(**overrides):
    d = tiny_model_dict()
    d["vision"]["layers"] = d["text"]["layers"] = 2
    return dataclasses.replace(CLIPConfig.from_dict(d), **overrides)


def inputs():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    tokens = rng.integers(1, 60, (3, 12)).astype(np.int32)
    tokens[:, 7] = 63  # end-of-text, the largest id
    tokens[:, 8:] = 0
    return jnp.asarray(images), jnp.asarray(tokens)


def stack_layers(params):
    """Unrolled `resblocks_i` -> scanned `resblocks` with a leading layer axis."""
    out = {}
    for k, v in params.items():
        if isinstance(v, dict) and "resblocks_0" in v:
            n = sum(1 for name in v if name.startswith("resblocks_"))
            out[k] = {"resblocks": jax.tree.map(lambda *xs: jnp.stack(xs), *[v[f"resblocks_{i}"] for i in range(n)])}
        elif isinstance(v, dict):
            out[k] = stack_layers(v)
        else:
            out[k] = v
    return out


@pytest.fixture(scope="module")
def reference():
    model = CLIP(base_config())
    images, tokens = inputs()
    params = nn.unbox(model.init(jax.random.PRNGKey(0), images, tokens)["params"])
    return params, model.apply({"params": params}, images, tokens)


def test_scanned_layers_equal_unrolled(reference):
    params, want = reference
    images, tokens = inputs()
    got = CLIP(base_config(scan_layers=True)).apply({"params": stack_layers(params)}, images, tokens)
    for k in ("image", "text"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", sorted(set(REMAT_POLICIES) - {"none"}))
def test_remat_policies_give_the_same_gradients(reference, policy):
    params, _ = reference
    images, tokens = inputs()

    def loss(model, p):
        out = model.apply({"params": p}, images, tokens)
        return jnp.sum(out["image"] @ out["text"].T * out["logit_scale"])

    want = jax.grad(lambda p: loss(CLIP(base_config()), p))(params)
    got = jax.grad(lambda p: loss(CLIP(base_config(remat_policy=policy)), p))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_token_embeddings_path_equals_token_ids(reference):
    params, want = reference
    model = CLIP(base_config())
    _, tokens = inputs()
    embeds = model.apply({"params": params}, tokens, method=lambda m, t: m.text.embed_tokens(t))
    got = model.apply({"params": params}, token_embeddings=embeds, pool_index=jnp.argmax(tokens, -1),
                      method=CLIP.encode_text)
    np.testing.assert_allclose(got, want["text"], rtol=1e-6, atol=1e-6)


def test_bfloat16_compute_is_close_to_float32(reference):
    params, want = reference
    images, tokens = inputs()
    got = CLIP(base_config(dtype="bfloat16")).apply({"params": params}, images, tokens)
    for k in ("image", "text"):
        assert got[k].dtype == jnp.float32  # embeddings are normalised in float32
        cosine = np.sum(np.asarray(got[k]) * np.asarray(want[k]), axis=-1)
        assert cosine.min() > 0.99, cosine


def test_wrong_image_size_is_a_clear_error(reference):
    params, _ = reference
    with pytest.raises(ValueError, match="expects 32x32 images"):
        CLIP(base_config()).apply({"params": params}, jnp.zeros((1, 48, 48, 3), jnp.uint8), method=CLIP.encode_image)
