"""Model variants compute the same function: scanned vs unrolled layers, every remat policy, token embeddings in
place of ids; bf16 compute stays close to fp32."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.models import layers
from clip_jax.models.clip import CLIP, CLIPConfig
from clip_jax.models.layers import (
    REMAT_POLICIES,
    LayerNorm,
    PatchEmbedding,
    Transformer,
    dot_product_attention,
    padded_to_even,
    resolved_attention,
    resolved_layer_norm,
)

from .test_methods import compiled
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
    # Compiled here and below: one program each instead of the op-by-op dispatch of every primitive.
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), images, tokens)["params"])
    return params, jax.jit(model.apply)({"params": params}, images, tokens)


def test_scanned_layers_equal_unrolled(reference):
    params, want = reference
    images, tokens = inputs()
    got = jax.jit(CLIP(base_config(scan_layers=True)).apply)({"params": stack_layers(params)}, images, tokens)
    for k in ("image", "text"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", sorted(set(REMAT_POLICIES) - {"none"}))
def test_remat_policies_give_the_same_gradients(reference, policy):
    params, _ = reference
    images, tokens = inputs()

    # Compiled: one program each instead of the op-by-op dispatch of every primitive of the backward pass.
    want = jax.jit(jax.grad(lambda p: pair_loss(CLIP(base_config()), p, images, tokens)))(params)
    got = jax.jit(jax.grad(lambda p: pair_loss(CLIP(base_config(remat_policy=policy)), p, images, tokens)))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        # Recomputing fuses the program differently: float32 rounding, relative to the leaf's largest gradient.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))


def pair_loss(model, params, images, tokens):
    out = model.apply({"params": params}, images, tokens)
    return jnp.sum(out["image"] @ out["text"].T * out["logit_scale"])


def test_unrolled_blocks_pass_the_gradient_through_a_conditional_on_cpu(reference):
    """layers.block_boundary: on XLA:CPU each unrolled block hands the residual gradient on through a conditional
    (without it XLA fuses the gradient chain of all later blocks into each block: quadratic in depth). The count
    checks that XLA has not simplified them away; the gradients equal those of the scanned stack, which has none."""
    params, _ = reference
    images, tokens = inputs()
    grad = jax.jit(jax.grad(lambda p: pair_loss(CLIP(base_config()), p, images, tokens)))
    assert grad.lower(params).compile().as_text().count(" conditional(") == 4  # 2 image + 2 text blocks
    scanned = jax.jit(jax.grad(lambda p: pair_loss(CLIP(base_config(scan_layers=True)), p, images, tokens)))
    want = stack_layers(grad(params))
    for a, b in zip(jax.tree.leaves(scanned(stack_layers(params))), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))


def test_token_embeddings_path_equals_token_ids(reference):
    params, want = reference
    model = CLIP(base_config())
    _, tokens = inputs()
    embeds = compiled(model, lambda m, t: m.text.embed_tokens(t))({"params": params}, tokens)
    by_embeddings = lambda m, e, i: m.encode_text(token_embeddings=e, pool_index=i)
    got = compiled(model, by_embeddings)({"params": params}, embeds, jnp.argmax(tokens, -1))
    np.testing.assert_allclose(got, want["text"], rtol=1e-6, atol=1e-6)


def test_bfloat16_compute_is_close_to_float32(reference):
    params, want = reference
    images, tokens = inputs()
    got = jax.jit(CLIP(base_config(dtype="bfloat16")).apply)({"params": params}, images, tokens)
    for k in ("image", "text"):
        assert got[k].dtype == jnp.float32  # embeddings are normalised in float32
        cosine = np.sum(np.asarray(got[k]) * np.asarray(want[k]), axis=-1)
        assert cosine.min() > 0.99, cosine


def test_wrong_image_size_is_a_clear_error(reference):
    params, _ = reference
    with pytest.raises(ValueError, match="expects 32x32 images"):
        CLIP(base_config()).apply({"params": params}, jnp.zeros((1, 48, 48, 3), jnp.uint8), method=CLIP.encode_image)


# --- patch dropout ---------------------------------------------------------------------------------------------------
def test_keep_random_patches_keeps_the_class_token_and_distinct_patches_per_row():
    tokens = jnp.asarray(np.random.default_rng(0).normal(size=(4, 1 + 16, 8)).astype(np.float32))
    kept = np.asarray(layers.keep_random_patches(tokens, 5, jax.random.key(0)))
    assert kept.shape == (4, 1 + 5, 8)
    np.testing.assert_array_equal(kept[:, 0], tokens[:, 0])
    chosen = []
    for row in range(4):
        # each kept token is one of the row's own patch tokens, none twice
        index = [int(np.flatnonzero((np.asarray(tokens[row, 1:]) == t).all(-1))[0]) for t in kept[row, 1:]]
        assert len(set(index)) == 5
        chosen.append(frozenset(index))
    assert len(set(chosen)) > 1  # rows draw their own subsets
    # one key per row (the pipeline's `dropout_key`): a row's draw depends on its own key alone
    same = np.stack([tokens[0]] * 3)
    keys = np.array([[1, 2], [3, 4], [1, 2]], np.uint32)
    kept = np.asarray(layers.keep_random_patches(same, 5, keys))
    np.testing.assert_array_equal(kept[0], kept[2])
    assert not np.array_equal(kept[0], kept[1])
    alone = np.asarray(layers.keep_random_patches(same[:1], 5, keys[:1]))
    np.testing.assert_array_equal(alone[0], kept[0])


@pytest.fixture(scope="module")
def dropout_model():
    """A 4x4-patch tower with patch dropout 0.5 (8 of 16 patches kept), its parameters and one image."""
    cfg = base_config()
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=64, patch_dropout=0.5))
    model = CLIP(cfg)
    image = jnp.asarray(np.random.default_rng(2).integers(0, 256, (1, 64, 64, 3)).astype(np.uint8))
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), image, inputs()[1][:1])["params"])
    return cfg, model, params, image


def influential_patches(model, params, image, rng):
    """The patches whose pixels change the image embedding (each inverted alone), for one image and one rng."""
    grid = 4
    variants = [image[0]]
    for row in range(grid):
        for col in range(grid):
            patch = (slice(16 * row, 16 * row + 16), slice(16 * col, 16 * col + 16))
            variants.append(image[0].at[patch].set(255 - image[0][patch]))
    options = {} if rng is None else {"dropout_rng": rng}
    # one image at a time (vmap), so every variant gets the same draw of kept patches
    embed = jax.jit(jax.vmap(lambda x: model.apply({"params": params}, x[None], method=CLIP.encode_image,
                                                   **options)[0]))
    out = np.asarray(embed(jnp.stack(variants)))
    return frozenset(i for i in range(grid * grid) if np.abs(out[1 + i] - out[0]).max() > 1e-6)


def test_patch_dropout_embeds_an_image_from_a_random_subset_of_its_patches(dropout_model):
    cfg, model, params, image = dropout_model
    assert (cfg.vision.grid, cfg.vision.num_patches, cfg.vision.kept_patches) == (4, 16, 8)  # 64 px / 16 px patches
    first = influential_patches(model, params, image, jax.random.key(1))
    second = influential_patches(model, params, image, jax.random.key(2))
    assert len(first) == len(second) == 8 and first != second
    # without an rng (evaluation, inference) every patch counts, and the result is the tower's without dropout
    assert len(influential_patches(model, params, image, None)) == 16
    plain = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, patch_dropout=0.0))
    np.testing.assert_array_equal(compiled(model, CLIP.encode_image)({"params": params}, image),
                                  compiled(CLIP(plain), CLIP.encode_image)({"params": params}, image))
    # the same image twice in a batch: two draws
    dropped = lambda m, x, rng: m.image_features(x, dropout_rng=rng)
    twice = compiled(model, dropped)({"params": params}, jnp.concatenate([image, image]), jax.random.key(1))
    assert twice.tokens.shape == (2, 1 + 8, cfg.vision.width)
    assert np.abs(np.asarray(twice.pooled[0] - twice.pooled[1])).max() > 1e-4


# --- stochastic depth -----------------------------------------------------------------------------------------------
def test_stochastic_depth_scales_follow_the_linear_rule_and_each_rows_key():
    rows, rate = 4000, 0.6
    keys = np.random.default_rng(0).integers(0, 2**32, (rows, 2), dtype=np.uint32)
    scales = np.asarray(layers.stochastic_depth_scales(jnp.asarray(keys), 4, rate, rows))
    assert scales.shape == (4, 2, rows)
    for layer, p in enumerate([0.0, 0.2, 0.4, 0.6]):  # rate * l / (L - 1)
        kept = scales[layer] > 0
        np.testing.assert_allclose(scales[layer][kept], 1 / (1 - p), rtol=1e-6)  # a kept branch, rescaled
        bound = 5 * np.sqrt(p * (1 - p) / kept.size)  # five standard deviations of the dropped share
        assert abs((~kept).mean() - p) <= bound, (layer, (~kept).mean())
    assert (scales[0] == 1).all()  # the first block is never dropped
    assert not (scales[3, 0] == scales[3, 1]).all()  # the two branches draw apart
    # a row's draw depends on its own key alone (the same key twice; a row alone), and one key also serves a batch
    same = np.asarray(layers.stochastic_depth_scales(jnp.asarray(keys[[0, 1, 0]]), 4, rate, 3))
    np.testing.assert_array_equal(same[..., 0], same[..., 2])
    np.testing.assert_array_equal(same[..., :2], scales[..., :2])
    assert layers.stochastic_depth_scales(jax.random.key(0), 4, rate, 5).shape == (4, 2, 5)
    assert (np.asarray(layers.stochastic_depth_scales(jnp.asarray(keys), 4, 0.0, rows)) == 1).all()


@pytest.mark.parametrize("scan", [False, True])
def test_stochastic_depth_equals_the_plain_tower_with_each_images_dropped_branches_zeroed(scan):
    """Each image's skipped branch adds nothing and its kept branch adds 1 / (1 - p) times its output. The branch
    ends in a linear projection (attention's `out_proj`, the MLP's `c_proj`), so scaling that projection by the
    image's factor in the plain tower must give the same embedding: an independent path to the same function."""
    cfg = base_config(scan_layers=scan)  # 2 image blocks: the second drops each branch with p = 0.5
    deep = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, stochastic_depth=0.5))
    images = inputs()[0]
    plain_params = nn.unbox(CLIP(base_config()).init(jax.random.key(0), images, inputs()[1])["params"])
    keys = jnp.asarray(np.arange(6, dtype=np.uint32).reshape(3, 2))
    scales = np.asarray(layers.stochastic_depth_scales(keys, 2, 0.5, 3))
    assert set(np.unique(scales[1])) == {0.0, 2.0}  # these keys drop some branches and keep others
    params = stack_layers(plain_params) if scan else plain_params
    got = CLIP(deep).apply({"params": params}, images, method=CLIP.encode_image, dropout_rng=keys)
    for row in range(3):
        blocks = dict(plain_params["visual"]["transformer"])
        for layer in range(2):
            block = blocks[f"resblocks_{layer}"]
            scaled = {branch: jax.tree.map(lambda w, f=float(scales[layer, i, row]): w * f, block[branch][proj])
                      for i, (branch, proj) in enumerate([("attn", "out_proj"), ("mlp", "c_proj")])}
            blocks[f"resblocks_{layer}"] = {**block, **{b: {**block[b], proj: w} for (b, w), proj in
                                                        zip(scaled.items(), ("out_proj", "c_proj"), strict=True)}}
        manual = {**plain_params, "visual": {**plain_params["visual"], "transformer": blocks}}
        want = CLIP(base_config()).apply({"params": manual}, images[row : row + 1], method=CLIP.encode_image)
        np.testing.assert_allclose(got[row], want[0], rtol=1e-5, atol=1e-6)
    # without a key (evaluation, inference) every branch runs unscaled: the plain tower
    np.testing.assert_array_equal(CLIP(deep).apply({"params": params}, images, method=CLIP.encode_image),
                                  CLIP(cfg).apply({"params": params}, images, method=CLIP.encode_image))


def _layer_norm(x: np.ndarray, params: dict) -> np.ndarray:
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * np.asarray(params["scale"]) + np.asarray(params["bias"])


def test_a_mean_pooled_vit_projects_the_mean_of_its_patch_tokens_through_ln_post():
    """`model.vision.pool` "mean" (big_vision's gap, open_clip's avg pool): the same parameters as the class-token
    tower, and the feature is ln_post of each patch token (not the class token), averaged, projected; computed here
    in numpy from the token states the tower returns. Under patch dropout the mean is over the kept patches; MaPLe's
    deep prompts, appended after the patches, are not in it."""
    cfg = base_config()
    mean_cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, pool="mean", patch_dropout=0.5))
    images, tokens = inputs()
    params = nn.unbox(jax.jit(CLIP(cfg).init)(jax.random.key(0), images, tokens)["params"])
    # the parameters' structure, traced only (shapes, no values)
    assert jax.tree.structure(nn.unbox(jax.eval_shape(CLIP(mean_cfg).init, jax.random.key(0), images, tokens)[
        "params"])) == jax.tree.structure(params)
    visual = params["visual"]
    keys = jnp.asarray(np.arange(6, dtype=np.uint32).reshape(3, 2))
    # the token states and the unnormalised embedding, in one program per combination of options (which travel as
    # one argument: a dict whose None entries are empty pytrees)
    both = compiled(CLIP(mean_cfg), lambda m, x, options: (m.image_features(x, **options),
                                                             m.encode_image(x, normalize=False, **options)))
    for dropout_rng, prompts in [(None, None), (keys, None), (None, deep_prompts()), (keys, deep_prompts())]:
        options = {"dropout_rng": dropout_rng, "layer_prompts": prompts}
        out, pooled = both({"params": params}, images, options)
        states = np.asarray(out.tokens, np.float64)
        patches = 2 if dropout_rng is not None else 4  # kept under patch dropout
        # class token, patches, then MaPLe's prompts, which the mean leaves out
        assert states.shape[1] == 1 + patches + (0 if prompts is None else 2)
        want = _layer_norm(states[:, 1:1 + patches], visual["ln_post"]).mean(axis=1) @ np.asarray(visual["proj"])
        np.testing.assert_allclose(np.asarray(pooled), want, rtol=1e-5, atol=1e-5)
        if dropout_rng is None and prompts is None:
            every_patch = states, want
    # the default pools the class token of the same token states
    plain, class_pooled = compiled(CLIP(cfg), lambda m, x: (m.image_features(x), m.encode_image(x, normalize=False)))(
        {"params": params}, images)
    np.testing.assert_allclose(np.asarray(plain.tokens), every_patch[0], rtol=1e-6, atol=1e-6)
    class_token = _layer_norm(every_patch[0][:, 0], visual["ln_post"]) @ np.asarray(visual["proj"])
    np.testing.assert_allclose(np.asarray(class_pooled), class_token, rtol=1e-5, atol=1e-5)
    assert not np.allclose(class_token, every_patch[1], atol=1e-3)


# --- token states and deep prompts (MaPLe) ---------------------------------------------------------------------------
def test_towers_return_token_states_that_their_pooled_feature_is_made_of(reference):
    params, want = reference
    images, tokens = inputs()
    model = CLIP(base_config())
    vision = model.apply({"params": params}, images, method=CLIP.image_features)
    text = model.apply({"params": params}, tokens, method=CLIP.text_features)
    assert vision.tokens.shape == (3, (32 // 16) ** 2 + 1, 32) and text.tokens.shape == (3, 12, 32)
    # the pooled features from the token states by hand: ln_post of the class token, ln_final at end-of-text
    layer_norm = lambda p, x: nn.LayerNorm(epsilon=1e-5).apply({"params": p}, x)
    v, t = params["visual"], params["text"]
    pooled_image = layer_norm(v["ln_post"], vision.tokens[:, 0]) @ v["proj"]
    pooled_text = layer_norm(t["ln_final"], text.tokens[jnp.arange(3), 7]) @ t["text_projection"]
    np.testing.assert_allclose(vision.pooled, pooled_image, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(text.pooled, pooled_text, rtol=1e-5, atol=1e-6)
    normalised = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(normalised(np.asarray(vision.pooled)), want["image"], rtol=1e-5, atol=1e-6)


def deep_prompts(layers=2, count=2, width=32):
    return jnp.asarray(np.random.default_rng(1).normal(size=(layers, count, width)).astype(np.float32))


def test_deep_prompts_replace_the_prompt_tokens_before_each_later_block(reference):
    """Text: the tokens at 1..M are replaced by layer l's prompts before block l (l >= 1); checked against the
    blocks applied one by one with the replacement done by hand."""
    from clip_jax.models.layers import ResidualBlock

    params, _ = reference
    _, tokens = inputs()
    model = CLIP(base_config())
    prompts = deep_prompts()
    got = model.apply({"params": params}, tokens, layer_prompts=prompts, method=CLIP.text_features).tokens

    t = params["text"]
    x = jnp.take(t["token_embedding"]["embedding"], tokens, axis=0) + t["positional_embedding"][:12]
    block = ResidualBlock(num_heads=2, head_dim=16, mlp_dim=64, activation="gelu", causal=True, num_layers=2)
    x, _ = block.apply({"params": t["transformer"]["resblocks_0"]}, x)
    x = x.at[:, 1:3].set(prompts[1])
    x, _ = block.apply({"params": t["transformer"]["resblocks_1"]}, x)
    np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-5)
    # and they change the result, while prompts no block uses do not
    plain = model.apply({"params": params}, tokens, method=CLIP.text_features).tokens
    assert np.abs(np.asarray(got - plain)).max() > 1e-3
    unused = model.apply({"params": params}, tokens, layer_prompts=prompts, prompt_layers=jnp.zeros(2, bool),
                         method=CLIP.text_features).tokens
    np.testing.assert_allclose(unused, plain, rtol=1e-6, atol=1e-6)


def test_deep_prompts_are_the_same_with_scanned_layers(reference):
    params, _ = reference
    images, tokens = inputs()
    prompts = deep_prompts()
    want = CLIP(base_config()).apply({"params": params}, images, layer_prompts=prompts,
                                     method=CLIP.image_features)
    got = CLIP(base_config(scan_layers=True)).apply({"params": stack_layers(params)}, images, layer_prompts=prompts,
                                                     method=CLIP.image_features)
    # vision prompts go after the patch tokens: 5 tokens + 2 prompts
    assert got.tokens.shape == (3, 7, 32)
    np.testing.assert_allclose(got.tokens, want.tokens, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.pooled, want.pooled, rtol=1e-5, atol=1e-5)


# (32, 32): square patches (the image towers); 35: pixels past the last whole patch are dropped, as by VALID;
# (4, 8) on one channel: the audio tower's time x frequency patches of a spectrogram
@pytest.mark.parametrize(("size", "patch", "channels"), [((32, 32), 8, 3), ((35, 35), 8, 3), ((17, 35), (4, 8), 1)])
def test_patch_embedding_is_the_strided_convolution(size, patch, channels):
    images = jax.random.normal(jax.random.key(0), (2, *size, channels))
    embed = PatchEmbedding(width=16, patch_size=patch)
    params = nn.unbox(embed.init(jax.random.key(1), images)["params"])
    window = (patch, patch) if isinstance(patch, int) else patch
    assert params["kernel"].shape == (*window, channels, 16)  # nn.Conv's own layout: checkpoints load unchanged
    conv = nn.Conv(16, window, strides=window, padding="VALID", use_bias=False)
    want = conv.apply({"params": {"kernel": params["kernel"]}}, images)
    got = embed.apply({"params": params}, images)
    assert got.shape == want.shape == (2, 4, 4, 16)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal, lengths", [(False, (7, 7)), (True, (7, 7)), (False, (1, 7)), (True, (6, 6))])
def test_attention_padded_to_even_lengths_is_plain_attention(causal, lengths):
    # cuDNN's path (model.attention="cudnn") pads an odd sequence by one position that the length mask keeps out:
    # outputs and gradients are those of the plain call. Run here with XLA's implementation, as no GPU is at hand;
    # (1, 7) is a ResNet attention pool's single query, (6, 6) needs no padding.
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, lengths[0], 3, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, lengths[1], 3, 8)), jnp.float32) for _ in range(2))
    plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    padded = lambda q, k, v: padded_to_even(q, k, v, is_causal=causal, implementation="xla")
    # compiled: one program each instead of the op-by-op dispatch of every primitive
    out = jax.jit(padded)(q, k, v)
    assert out.shape == q.shape
    np.testing.assert_allclose(out, jax.jit(plain)(q, k, v), rtol=1e-5, atol=1e-6)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
    for got, want in zip(jax.jit(jax.grad(loss(padded), argnums=(0, 1, 2)))(q, k, v),
                         jax.jit(jax.grad(loss(plain), argnums=(0, 1, 2)))(q, k, v), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_attention_implementation_is_checked():
    x = jnp.zeros((1, 3, 2, 8))
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'; choose one of auto, xla, cudnn"):
        dot_product_attention(x, x, x, implementation="flash")


def test_auto_attention_is_cudnns_only_where_its_flash_attention_runs(monkeypatch):
    from types import SimpleNamespace

    assert [resolved_attention("auto", d, 64) for d in (jnp.bfloat16, jnp.float32)] == ["xla", "xla"]  # this CPU
    assert resolved_attention("cudnn", jnp.bfloat16) == "cudnn" and resolved_attention("xla", jnp.bfloat16) == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")

    def on(capability, dtype, head_dim):
        monkeypatch.setattr(jax, "devices", lambda: [SimpleNamespace(compute_capability=capability)])
        return resolved_attention("auto", dtype, head_dim)

    assert on("9.0", jnp.bfloat16, 64) == on("8.0", jnp.float16, 128) == on("9.0", jnp.bfloat16, 256) == "cudnn"
    assert on("9.0", jnp.float32, 64) == "xla"  # cuDNN's has no float32
    assert on("7.0", jnp.bfloat16, 64) == "xla"  # before Ampere
    assert on("8.6", jnp.bfloat16, 256) == on("9.0", jnp.bfloat16, 76) == "xla"  # head dims it refuses
    assert on("gfx90a", jnp.bfloat16, 64) == "xla"  # an AMD GPU


@pytest.mark.parametrize("causal, scan", [(False, False), (True, True)])
def test_cudnn_path_pads_an_odd_sequence_once_per_transformer(monkeypatch, causal, scan):
    # On a GPU, "auto" runs cuDNN's attention, which takes even lengths only: the Transformer pads an odd sequence by
    # one token once for its whole stack, and every layer masks it out. The cuDNN path runs here with XLA's
    # implementation underneath: outputs and gradients are plain attention's, every attention call sees an even
    # length, and the stack has one pad where the per-layer padding had three a layer.
    make = lambda attention: Transformer(num_layers=3, num_heads=2, head_dim=8, mlp_dim=32, activation="quick_gelu",
                                         causal=causal, scan_layers=scan, attention=attention)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 16)), jnp.float32)
    params = jax.jit(make("xla").init)(jax.random.PRNGKey(0), x)
    want = jax.jit(make("xla").apply)(params, x)
    want_grads = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(make("xla").apply(p, x))), argnums=(0, 1)))(params, x)

    lengths_seen = []
    xla_attention = jax.nn.dot_product_attention

    def attention_as_xla(query, *args, implementation=None, **kwargs):
        lengths_seen.append(query.shape[1])
        return xla_attention(query, *args, implementation="xla", **kwargs)

    monkeypatch.setattr(layers, "resolved_attention", lambda implementation, dtype, head_dim=None: implementation)
    monkeypatch.setattr(jax.nn, "dot_product_attention", attention_as_xla)
    cudnn = lambda p, x: make("cudnn").apply(p, x)
    np.testing.assert_allclose(jax.jit(cudnn)(params, x), want, rtol=1e-5, atol=1e-6)
    grads = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(cudnn(p, x))), argnums=(0, 1)))(params, x)
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert set(lengths_seen) == {8}
    assert str(jax.make_jaxpr(cudnn)(params, x)).count(" pad[") == 1


@pytest.mark.parametrize("shape, dtype, out_dtype", [
    ((3, 37, 96), jnp.float32, jnp.float32),  # 111 rows: the last programs' tiles run past the end
    ((2, 13, 80), jnp.bfloat16, jnp.bfloat16),  # a width below its 128 lanes
    ((4, 9, 48), jnp.float32, jnp.bfloat16),  # the residual stream in float32, the output in the compute dtype
])
def test_pallas_layer_norm_kernels_match_layer_norm_and_its_autodiff(shape, dtype, out_dtype):
    # The Triton kernels (model.layer_norm="pallas") through Pallas's interpreter against layers.layer_norm in
    # float32 and JAX's autodiff of it: output, and the input's, scale's and bias's gradients.
    from clip_jax.models import layer_norm_kernel

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape) * 3 + 1, dtype)
    scale, bias = (jnp.asarray(rng.normal(size=shape[-1:]), jnp.float32) for _ in range(2))
    dy = jnp.asarray(rng.normal(size=shape), out_dtype)
    kernel = lambda x, s, b: layer_norm_kernel.layer_norm(x, s, b, 1e-5, out_dtype, rows=4, chunks=3, interpret=True)
    reference = lambda x, s, b: layers.layer_norm(x, {"scale": s, "bias": b}).astype(out_dtype)
    y, kernel_vjp = jax.vjp(kernel, x, scale, bias)
    want, reference_vjp = jax.vjp(reference, x, scale, bias)
    assert y.dtype == jnp.dtype(out_dtype)
    # bf16 outputs may differ by one rounding step; float32 by float32 rounding of a different summation order
    tolerance = 1e-2 if jnp.dtype(out_dtype) == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want, np.float32), rtol=tolerance, atol=tolerance)
    for got, expected in zip(kernel_vjp(dy), reference_vjp(dy), strict=True):
        got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())


def test_auto_layer_norm_is_the_pallas_kernels_only_on_hopper_gpus(monkeypatch):
    from types import SimpleNamespace

    from clip_jax.models import layer_norm_kernel

    assert resolved_layer_norm("auto") == "xla"  # this CPU
    assert resolved_layer_norm("pallas") == "pallas" and resolved_layer_norm("xla") == "xla"
    with pytest.raises(ValueError, match="unknown LayerNorm implementation 'triton'; choose one of auto, xla, pallas"):
        resolved_layer_norm("triton")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")

    def on(capability):
        monkeypatch.setattr(jax, "devices", lambda: [SimpleNamespace(compute_capability=capability)])
        return resolved_layer_norm("auto")

    assert on("9.0") == "pallas"  # Hopper: the H100, where the kernels were timed, and the H200
    assert on("8.0") == on("10.0") == on("12.0") == "xla"  # untimed: Ampere, Blackwell
    # a LayerNorm left at "auto" runs the kernels there (interpreted here), with XLA's output
    on("9.0")
    monkeypatch.setattr(layer_norm_kernel, "INTERPRET", True)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 12)), jnp.float32)
    params = LayerNorm().init(jax.random.PRNGKey(0), x)
    assert "layer_norm_forward" in str(jax.make_jaxpr(LayerNorm().apply)(params, x))
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert "layer_norm_forward" not in str(jax.make_jaxpr(LayerNorm().apply)(params, x))
    np.testing.assert_allclose(LayerNorm(implementation="pallas").apply(params, x), LayerNorm().apply(params, x),
                               rtol=1e-5, atol=1e-5)


def test_pallas_layer_norm_in_a_scanned_rematerialised_transformer(monkeypatch):
    # model.layer_norm="pallas" threads to every block's LayerNorms (under nn.scan and remat here) and gives XLA's
    # outputs and gradients; off a GPU it is refused in one line unless the kernels are interpreted (the tests).
    from clip_jax.errors import ConfigError
    from clip_jax.models import layer_norm_kernel

    make = lambda layer_norm: Transformer(num_layers=2, num_heads=2, head_dim=8, mlp_dim=32, activation="quick_gelu",
                                          causal=True, scan_layers=True, remat_policy="dots", layer_norm=layer_norm)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 16)), jnp.float32)
    params = make("xla").init(jax.random.PRNGKey(0), x)
    with pytest.raises(ConfigError, match="model.layer_norm 'pallas' runs Triton kernels on NVIDIA GPUs"):
        make("pallas").apply(params, x)
    monkeypatch.setattr(layer_norm_kernel, "INTERPRET", True)
    loss = lambda layer_norm: lambda p, x: jnp.sum(jnp.sin(make(layer_norm).apply(p, x)))
    np.testing.assert_allclose(make("pallas").apply(params, x), make("xla").apply(params, x), rtol=1e-5, atol=1e-5)
    grads = jax.grad(loss("pallas"), argnums=(0, 1))(params, x)
    want = jax.grad(loss("xla"), argnums=(0, 1))(params, x)
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert "layer_norm_forward" in str(jax.make_jaxpr(loss("pallas"))(params, x))


def test_pallas_layer_norm_lowers_to_triton_kernels_for_a_gpu():
    # Without a GPU the kernels still lower for one (Pallas's Triton lowering runs in Python; JAX 0.11 asks which
    # GPU, here the H200 they were written for): one Triton call forward and one backward at B/16's image shape, rows
    # tiled as the defaults say.
    from jax.sharding import AbstractDevice, AbstractMesh

    from clip_jax.models import layer_norm_kernel

    def forward_and_backward(x, scale, bias, dy):
        y, vjp = jax.vjp(lambda *a: layer_norm_kernel.layer_norm(*a, 1e-5, jnp.bfloat16), x, scale, bias)
        return (y, *vjp(dy))

    tokens = jax.ShapeDtypeStruct((512, 198, 768), jnp.bfloat16)
    width = jax.ShapeDtypeStruct((768,), jnp.float32)
    h200 = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind="NVIDIA H200", num_cores=None,
                                                                      platform="cuda"))
    with jax.sharding.use_abstract_mesh(h200):
        exported = jax.export.export(jax.jit(forward_and_backward), platforms=["cuda"], disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(tokens, width, width, tokens)
    calls = [line for line in exported.mlir_module().splitlines() if "__gpu$xla.gpu.triton" in line]
    assert [('"layer_norm_forward"' in c, '"layer_norm_backward"' in c) for c in calls] == [(True, False),
                                                                                          (False, True)]
    rows = 512 * 198
    assert f"grid_x = {rows // 4} : i32" in calls[0] and f"grid_x = {-(-rows // 128)} : i32" in calls[1]


def test_pallas_layer_norm_runs_per_device_on_a_mesh(monkeypatch):
    # On the trainer's mesh (here data 2 x fsdp 2 x tensor 2 of the session's 8 devices) the kernels run per device
    # on its rows through shard_map, and the jitted stack's outputs and gradients, the LayerNorm scales' summed over
    # devices, are XLA's.
    from clip_jax.models import layer_norm_kernel
    from clip_jax.sharding import LOGICAL_RULES, make_mesh

    monkeypatch.setattr(layer_norm_kernel, "INTERPRET", True)
    make = lambda layer_norm: Transformer(num_layers=2, num_heads=2, head_dim=8, mlp_dim=32, activation="quick_gelu",
                                          causal=False, layer_norm=layer_norm)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 5, 16)), jnp.float32)
    params = make("xla").init(jax.random.PRNGKey(0), x)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    loss = lambda layer_norm: jax.jit(jax.value_and_grad(
        lambda p, x: jnp.sum(jnp.sin(make(layer_norm).apply(p, x))), argnums=(0, 1)))
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        (value, grads), (want_value, want_grads) = loss("pallas")(params, x), loss("xla")(params, x)
        assert "shard_map" in str(jax.make_jaxpr(loss("pallas"))(params, x))
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
