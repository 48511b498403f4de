"""CoCoOp and MaPLe (clip_jax/methods/prompt_learning.py), each against an expectation written apart from the method:
CoCoOp's per-image prompts are CoOp's context shifted by the meta-net computed in numpy, and with a zero meta-net
CoCoOp is CoOp; MaPLe's vision prompts are the coupling maps of its text prompts, and its logits are the towers run
block by block with the prompt tokens replaced by hand; their configuration mistakes are one line."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.config import ConfigError
from clip_jax.data.pipeline import tokenizer_corpus
from clip_jax.data.tokenizer import ClipTokenizer
from clip_jax.methods import get_method
from clip_jax.methods.few_shot import FewShotCLIP
from clip_jax.methods.prompt_learning import MultimodalPrompts
from clip_jax.models.clip import CLIP_MEAN, CLIP_STD
from clip_jax.models.layers import ResidualBlock

from .test_methods import VOCAB, compiled, prepared, tiny_config, tiny_few_shot


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer.train(tokenizer_corpus(tiny_config("clip"), 500), VOCAB)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def features(n, dim, seed=2):
    return unit(np.random.default_rng(seed).normal(size=(n, dim))).astype(np.float32)


def start(method, seed=1):
    """The method's parameters as a run starts them: a random CLIP, the learner warm-started from it."""
    initial = nn.unbox(method.model().init(jax.random.PRNGKey(seed), *method.init_inputs())["params"])
    return method.warm_start({k: v for k, v in initial.items() if k != "learner"}, initial)


def layer_norm(params, x):
    return np.asarray(nn.LayerNorm(epsilon=1e-5).apply({"params": params}, jnp.asarray(x)))


def text_rows(tokenizer, table, ctx, words, name, length):
    """A class prompt's token embeddings [T, W] and its end-of-text position: [SOT] ctx words name . [EOT] pad."""
    embed = lambda ids: [table[i] for i in ids]
    rows = embed([tokenizer.sot_id]) + list(ctx) + embed(words + tokenizer.encode(name))
    rows += embed([*tokenizer.encode("."), tokenizer.eot_id])
    eot = len(rows) - 1
    return np.stack(rows + embed([0] * (length - len(rows)))), eot


# --- CoCoOp ----------------------------------------------------------------------------------------------------------
def test_cocoop_prompts_are_coops_context_shifted_by_the_meta_net(tokenizer):
    config = tiny_few_shot(tiny_config("cocoop"))
    config.eval.batch_size = 6  # 3 classes: chunks of 2 images, the last one padded
    method = prepared(config, tokenizer)
    params = start(method)
    table = np.asarray(params["text"]["token_embedding"]["embedding"])
    phrase = tokenizer.encode("a photo of a")
    ctx = np.asarray(params["learner"]["context"]["ctx"])
    np.testing.assert_array_equal(ctx, table[phrase])  # started from the phrase, M = its token count
    classes, f = method.task.base[:3], features(5, config.model.embed_dim)
    got = method.scores(params, {"features": f}, classes)

    meta = jax.tree.map(np.asarray, params["learner"]["meta_net"])
    assert meta["linear1"]["kernel"].shape == (16, 1)  # D -> D / 16
    hidden = np.maximum(f @ meta["linear1"]["kernel"] + meta["linear1"]["bias"], 0)
    shift = hidden @ meta["linear2"]["kernel"] + meta["linear2"]["bias"]  # pi(x) [B, W]
    assert np.abs(shift).max() > 1e-3
    rows, eots = [], []
    for i in range(len(f)):
        for c in classes:
            r, eot = text_rows(
                tokenizer, table, ctx + shift[i], [], method.task.class_names[c], config.model.text.context_length
            )
            rows.append(r)
            eots.append(eot)
    text = compiled(method.model(), lambda m, e, i: FewShotCLIP.encode_text(m, token_embeddings=e, pool_index=i))(
        {"params": params}, jnp.asarray(np.stack(rows)), jnp.asarray(eots))
    text = np.asarray(text).reshape(len(f), len(classes), -1)
    scale = float(np.exp(params["logit_scale"]))
    np.testing.assert_allclose(got, scale * np.einsum("bd,bcd->bc", f, text), rtol=1e-5, atol=1e-5)


def test_cocoop_with_a_zero_meta_net_is_coop(tokenizer):
    cocoop = prepared(tiny_few_shot(tiny_config("cocoop")), tokenizer)
    coop_config = tiny_config("coop")
    coop_config.method.update(n_ctx=4, ctx_init="a photo of a")
    coop = prepared(tiny_few_shot(coop_config), tokenizer)
    params = start(cocoop)
    last = params["learner"]["meta_net"]["linear2"]
    params["learner"]["meta_net"]["linear2"] = jax.tree.map(jnp.zeros_like, last)
    coop_params = {**params, "learner": {"ctx": params["learner"]["context"]["ctx"] + 0.01}}
    params["learner"]["context"]["ctx"] = coop_params["learner"]["ctx"]  # the same context, not the phrase
    classes, f = cocoop.task.base[:4], features(6, cocoop.config.model.embed_dim)
    np.testing.assert_allclose(
        cocoop.scores(params, {"features": f}, classes),
        coop.scores(coop_params, {"features": f}, classes),
        rtol=1e-5,
        atol=1e-5,
    )


# --- MaPLe -----------------------------------------------------------------------------------------------------------
def test_maple_vision_prompts_are_the_coupling_maps_of_its_text_prompts():
    learner = MultimodalPrompts(n_ctx=2, depth=3, text_width=8, vision_width=12)
    params = jax.tree.map(np.asarray, learner.init(jax.random.PRNGKey(0))["params"])
    text, vision = jax.tree.map(np.asarray, learner.apply({"params": params}))
    assert params["deep_ctx"].shape == (2, 2, 8) and params["couple_kernel"].shape == (3, 8, 12)
    np.testing.assert_array_equal(text, np.concatenate([params["ctx"][None], params["deep_ctx"]]))
    for k in range(3):
        want = text[k] @ params["couple_kernel"][k] + params["couple_bias"][k]
        np.testing.assert_allclose(vision[k], want, rtol=1e-5, atol=1e-6)
    # one prompted layer ("shallow" MaPLe): no deep prompts
    shallow = MultimodalPrompts(n_ctx=2, depth=1, text_width=8, vision_width=12).init(jax.random.PRNGKey(0))
    assert set(shallow["params"]) == {"ctx", "couple_kernel", "couple_bias"}


def maple_config(depth, layers=2, **fields):
    config = tiny_config("maple")
    config.model.text.layers = config.model.vision.layers = layers
    config.method.update(prompt_depth=depth, **fields)
    return tiny_few_shot(config)


def run_blocks(x, blocks, cfg, causal, prompts, start):
    """The tower's blocks one by one; before block k >= 1 the M tokens from `start` become prompts[k] (if any)."""
    block = ResidualBlock(
        num_heads=cfg.heads,
        head_dim=cfg.head_dim,
        mlp_dim=cfg.mlp_dim,
        activation=cfg.activation,
        causal=causal,
        num_layers=cfg.layers,
    )
    for k in range(cfg.layers):
        x = np.array(x)
        if 1 <= k < len(prompts):
            x[:, start : start + prompts.shape[1]] = prompts[k]
        x = np.asarray(block.apply({"params": blocks[f"resblocks_{k}"]}, jnp.asarray(x))[0])
    return x


@pytest.mark.parametrize("depth", [1, 2])
def test_maple_logits_are_the_towers_run_by_hand_with_the_prompts_replaced(tokenizer, depth):
    config = maple_config(depth)
    config.eval.batch_size = 2  # 3 images: two chunks, the last one padded
    method = prepared(config, tokenizer)
    params = start(method)
    learner = jax.tree.map(np.asarray, params["learner"])
    table = np.asarray(params["text"]["token_embedding"]["embedding"])
    phrase = tokenizer.encode("a photo of a")
    np.testing.assert_array_equal(learner["ctx"], table[phrase[:2]])  # "a photo" (M = 2) starts the prompts
    learned = np.concatenate([learner["ctx"][None], learner.get("deep_ctx", np.zeros((0, 2, 32)))])
    coupled = np.einsum("kmt,ktv->kmv", learned, learner["couple_kernel"]) + learner["couple_bias"][:, None]
    classes = method.task.base[:3]
    images = method.task.test.read(range(3))
    got = method.scores(params, {"images": images}, classes)

    # text: [SOT] ctx "of a" name . [EOT], deep prompts at 1..M before block 1
    t, cfg = jax.tree.map(np.asarray, params["text"]), config.model
    rows = [
        text_rows(tokenizer, table, learner["ctx"], phrase[2:], method.task.class_names[c], cfg.text.context_length)
        for c in classes
    ]
    x = np.stack([r for r, _ in rows]) + t["positional_embedding"]
    x = run_blocks(x, t["transformer"], cfg.text, True, learned, 1)
    pooled = layer_norm(t["ln_final"], x[np.arange(3), [eot for _, eot in rows]]) @ t["text_projection"]
    # image: patches, class token and positions, then the M coupled prompts (no positions), ln_pre, the blocks
    v, size = jax.tree.map(np.asarray, params["visual"]), cfg.vision.patch_size
    pixels = (images / 255.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    grid = cfg.vision.image_size // size
    patches = pixels.reshape(3, grid, size, grid, size, 3).transpose(0, 1, 3, 2, 4, 5).reshape(3, grid * grid, -1)
    tokens = patches @ v["conv1"]["kernel"].reshape(-1, cfg.vision.width)
    y = np.concatenate([np.broadcast_to(v["class_embedding"], (3, 1, cfg.vision.width)), tokens], axis=1)
    y = np.concatenate([y + v["positional_embedding"], np.broadcast_to(coupled[0], (3, 2, cfg.vision.width))], 1)
    y = run_blocks(layer_norm(v["ln_pre"], y), v["transformer"], cfg.vision, False, coupled, grid * grid + 1)
    image = layer_norm(v["ln_post"], y[:, 0]) @ v["proj"]
    scale = float(np.exp(params["logit_scale"]))
    np.testing.assert_allclose(got, scale * unit(image) @ unit(pooled).T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "depth, n_ctx, words",
    [
        (0, 2, "method.prompt_depth must be >= 1 (the prompted blocks of each tower), got 0"),
        (3, 2, "method.prompt_depth 3 exceeds the towers' depth (text 2, image 2 blocks): set it to at most 2"),
        (1, 0, "method.n_ctx must be >= 1, got 0"),
    ],
)
def test_maple_config_mistakes_are_one_line(depth, n_ctx, words):
    with pytest.raises(ConfigError) as e:
        get_method(maple_config(depth, n_ctx=n_ctx))
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["too_long", "phrase_too_short"])
def test_maple_prompts_that_do_not_fit_are_one_line(tokenizer, case):
    phrase = len(tokenizer.encode("a photo of a"))
    fields, words = {
        "too_long": ({"n_ctx": 21, "ctx_init": ""}, "the model's context length is 24: lower method.n_ctx"),
        "phrase_too_short": (
            {"n_ctx": phrase + 1},
            f"method.ctx_init 'a photo of a' has {phrase} tokens, fewer than method.n_ctx {phrase + 1}",
        ),
    }[case]
    with pytest.raises(ConfigError) as e:  # when the run is prepared, before any step
        prepared(maple_config(1, **fields), tokenizer)
    assert words in str(e.value) and "\n" not in str(e.value)
