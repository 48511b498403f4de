"""GroupViT's grouping pieces (models/grouping.py), each against something computed independently: numpy by hand,
the Gumbel-max sampling law, jax.grad of the soft weights, a trained-ViT copy."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from clip_jax.models.grouping import (
    GroupingBlock,
    GroupVisionTransformer,
    assignment_to_pixels,
    group_pool,
    gumbel_assignment,
    segment_assignment,
    vit_to_groupvit_params,
)
from clip_jax.models.positions import resize_grid_positions
from clip_jax.models.towers import VisionConfig, VisionTransformer
from clip_jax.sharding import LOGICAL_RULES, make_mesh, param_shardings

RNG = np.random.default_rng(0)
CONFIG = VisionConfig(width=32, layers=4, heads=2, head_dim=16, mlp_dim=64, activation="gelu", patch_size=8,
                      image_size=32)
STAGES = dict(stage_depths=(2, 1, 1), num_group_tokens=(8, 4, 0), num_output_groups=(8, 4))


def softmax(x, axis):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def assert_one_hot_over_groups(a):
    a = np.asarray(a)
    np.testing.assert_allclose(np.minimum(np.abs(a), np.abs(a - 1)), 0, atol=1e-6)  # every entry 0 or 1
    np.testing.assert_allclose(a.sum(-2), 1, atol=1e-6)  # each image token in exactly one group


def test_soft_assignment_is_a_softmax_over_the_group_axis():
    logits = RNG.normal(size=(2, 3, 5)).astype(np.float32)
    out = np.asarray(gumbel_assignment(jnp.asarray(logits), None, hard=False, gumbel=False))
    np.testing.assert_allclose(out, softmax(logits, axis=-2), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.sum(-2), 1, atol=1e-6)
    with pytest.raises(ValueError, match="rng"):
        gumbel_assignment(jnp.asarray(logits), None, hard=True)


def test_hard_assignment_is_the_one_hot_argmax_of_the_noisy_logits():
    logits = RNG.normal(size=(2, 4, 7)).astype(np.float32)
    key, tau = jax.random.key(3), 0.5
    out = gumbel_assignment(jnp.asarray(logits), key, hard=True, tau=tau)
    assert_one_hot_over_groups(out)
    noise = np.asarray(jax.random.gumbel(key, logits.shape, jnp.float32))
    picked = np.argmax((logits + noise) / tau, axis=-2)  # [2, 7]: a group per image token
    np.testing.assert_allclose(out, np.moveaxis(np.eye(4)[picked], -1, -2), atol=1e-6)


def test_hard_assignment_samples_groups_with_the_softmax_probabilities():
    # The Gumbel-max law: with the noise *added*, token n picks group g with probability softmax(logits[:, n])[g].
    probs = np.array([0.6, 0.3, 0.1], np.float32)
    logits = jnp.asarray(np.repeat(np.log(probs)[:, None], 20000, axis=1))[None]
    out = np.asarray(gumbel_assignment(logits, jax.random.key(0), hard=True))
    np.testing.assert_allclose(out[0].mean(-1), probs, atol=0.015)


def test_straight_through_gradient_is_the_soft_weights_gradient():
    logits = jnp.asarray(RNG.normal(size=(2, 3, 5)).astype(np.float32))
    weights = jnp.asarray(RNG.normal(size=(2, 3, 5)).astype(np.float32))
    key = jax.random.key(1)
    hard = lambda lg: gumbel_assignment(lg, key, hard=True)
    soft = lambda lg: gumbel_assignment(lg, key, hard=False)
    linear = lambda y: jnp.sum(weights * y)
    np.testing.assert_allclose(jax.grad(lambda lg: linear(hard(lg)))(logits),
                               jax.grad(lambda lg: linear(soft(lg)))(logits), rtol=1e-5, atol=1e-7)
    # A nonlinear function: its derivative is read at the (hard) forward value, then goes back through the soft map.
    curved = lambda y: jnp.sum(jnp.sin(3 * weights * y))
    _, back = jax.vjp(soft, logits)
    (expected,) = back(jax.grad(curved)(hard(logits)))
    np.testing.assert_allclose(jax.grad(lambda lg: curved(hard(lg)))(logits), expected, rtol=1e-5, atol=1e-7)


def test_group_pool_divides_by_the_total_weight_plus_one():
    attn = RNG.uniform(size=(2, 3, 6)).astype(np.float32)
    values = RNG.normal(size=(2, 6, 4)).astype(np.float32)
    expected = np.zeros((2, 3, 4), np.float32)
    for b in range(2):
        for g in range(3):
            for n in range(6):
                expected[b, g] += attn[b, g, n] / (attn[b, g].sum() + 1) * values[b, n]
    np.testing.assert_allclose(group_pool(jnp.asarray(attn), jnp.asarray(values)), expected, rtol=1e-5, atol=1e-6)
    # one-hot: a group's sum over its k tokens / (k + 1); a group without tokens gives 0
    onehot = np.zeros((1, 3, 4), np.float32)
    onehot[0, 0, [0, 1, 2]] = onehot[0, 1, 3] = 1
    out = np.asarray(group_pool(jnp.asarray(onehot), jnp.asarray(values[:1, :4])))
    np.testing.assert_allclose(out[0, 0], values[0, :3].sum(0) / 4, rtol=1e-5)
    np.testing.assert_allclose(out[0, 1], values[0, 3] / 2, rtol=1e-5)
    np.testing.assert_allclose(out[0, 2], 0)


@pytest.fixture(scope="module")
def block_setup():
    block = GroupingBlock(3, num_heads=2, head_dim=4, mlp_dim=16, activation="gelu")
    x = jnp.asarray(RNG.normal(size=(2, 6, 8)).astype(np.float32))
    groups = jnp.asarray(RNG.normal(size=(2, 4, 8)).astype(np.float32))
    params = nn.unbox(jax.jit(functools.partial(block.init, train=False))(jax.random.key(0), x, groups)["params"])
    # The assignment's output projection made the identity: its output is then group_pool(assignment, V) itself.
    params["assign"]["proj"] = {"kernel": jnp.eye(8), "bias": jnp.zeros(8)}
    return block, params, x, groups


@pytest.mark.parametrize("train", [True, False])
def test_grouping_block_pools_values_with_the_returned_assignment(block_setup, train):
    block, params, x, groups = block_setup
    apply = functools.partial(block.apply, train=train, capture_intermediates=True, mutable=["intermediates"])
    (out, assign), state = jax.jit(apply)({"params": params}, x, groups, rng=jax.random.key(5))
    assert out.shape == (2, 3, 8) and assign.shape == (2, 3, 6)
    assign = np.asarray(assign)
    if train:
        assert_one_hot_over_groups(assign)
    else:
        np.testing.assert_allclose(assign.sum(-2), 1, atol=1e-6)
        assert ((assign > 0) & (assign < 1)).all()
    seen = state["intermediates"]["assign"]
    values = np.asarray(seen["v_proj"]["__call__"][0])  # [2, 6, 8]
    pooled = np.asarray(seen["__call__"][0][0])  # [2, 3, 8]
    by_hand = np.einsum("bgn,bnd->bgd", assign / (assign.sum(-1, keepdims=True) + 1), values)
    np.testing.assert_allclose(pooled, by_hand, rtol=1e-5, atol=1e-6)


def test_hard_evaluation_pools_and_returns_the_one_hot_of_the_soft_assignment(block_setup):
    """eval_hard (the paper's inference): no noise, the one-hot of the soft assignment's argmax over groups, used for
    the pooling and returned for segmentation alike."""
    block, params, x, groups = block_setup
    soft = np.asarray(jax.jit(functools.partial(block.apply, train=False))({"params": params}, x, groups)[1])
    hard_block = block.clone(eval_hard=True)
    apply = functools.partial(hard_block.apply, train=False, capture_intermediates=True, mutable=["intermediates"])
    (_, hard), state = jax.jit(apply)({"params": params}, x, groups)
    hard = np.asarray(hard)
    assert_one_hot_over_groups(hard)
    np.testing.assert_array_equal(np.argmax(hard, axis=-2), np.argmax(soft, axis=-2))
    seen = state["intermediates"]["assign"]
    values = np.asarray(seen["v_proj"]["__call__"][0])
    by_hand = np.einsum("bgn,bnd->bgd", hard / (hard.sum(-1, keepdims=True) + 1), values)
    np.testing.assert_allclose(np.asarray(seen["__call__"][0][0]), by_hand, rtol=1e-5, atol=1e-6)


def test_grouping_block_trains_its_assignment_through_the_hard_one_hot(block_setup):
    block, params, x, groups = block_setup
    loss = lambda p: jnp.sum(block.apply({"params": p}, x, groups, train=True, rng=jax.random.key(5))[0] ** 2)
    grads = jax.jit(jax.grad(loss))(params)
    assert float(jnp.abs(grads["assign"]["q_proj"]["kernel"]).max()) > 0  # straight-through reaches q and k
    assert float(jnp.abs(grads["assign"]["k_proj"]["kernel"]).max()) > 0


def test_grouping_block_reduces_to_another_width(block_setup):
    _, _, x, groups = block_setup
    block = GroupingBlock(3, num_heads=2, head_dim=4, mlp_dim=16, activation="gelu", out_width=12)
    (out, assign), _ = jax.eval_shape(functools.partial(block.init_with_output, train=False), jax.random.key(0), x,
                                      groups)
    assert out.shape == (2, 3, 12) and assign.shape == (2, 3, 6)


def test_segment_assignment_is_the_product_of_the_stage_assignments():
    stages = [softmax(RNG.normal(size=shape), axis=-2).astype(np.float32)
              for shape in [(2, 5, 12), (2, 3, 5), (2, 2, 3)]]
    out = np.asarray(segment_assignment([jnp.asarray(s) for s in stages]))
    expected = np.stack([stages[2][b] @ stages[1][b] @ stages[0][b] for b in range(2)])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.sum(-2), 1, atol=1e-5)  # still a distribution over the final segments
    with pytest.raises(ValueError):
        segment_assignment([])


def test_assignment_to_pixels_is_half_pixel_bilinear():
    # A map linear in (row, col) stays linear; half-pixel centres put 4 output pixels at input coordinates
    # -0.25, 0.25, 0.75, 1.25, clamped at the borders to 0 and 1.
    assign = jnp.asarray([[[0.0, 1.0, 2.0, 3.0]]])  # 2x2 grid: value = 2 * row + col
    out = np.asarray(assignment_to_pixels(assign, 2, 4))
    coord = np.array([0, 0.25, 0.75, 1])
    np.testing.assert_allclose(out[0, 0], 2 * coord[:, None] + coord[None, :], atol=1e-6)
    with pytest.raises(ValueError):
        assignment_to_pixels(assign, 3, 6)


@pytest.fixture(scope="module")
def groupvit():
    model = GroupVisionTransformer(CONFIG, embed_dim=16, **STAGES)
    images = jnp.asarray(RNG.normal(size=(2, 32, 32, 3)).astype(np.float32))
    boxed = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), images)["params"]
    return model, boxed, nn.unbox(boxed), images


def test_groupvit_outputs_and_assignments(groupvit):
    model, _, params, images = groupvit
    for train in (True, False):
        out, assigns = jax.jit(functools.partial(model.apply, train=train))({"params": params}, images,
                                                                             rng=jax.random.key(1))
        assert out.pooled.shape == (2, 16) and out.tokens.shape == (2, 4, 32) and out.feature.shape == (2, 32)
        assert [a.shape for a in assigns] == [(2, 8, 16), (2, 4, 8)]
        np.testing.assert_allclose(out.feature, out.tokens.mean(1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.pooled, out.feature @ params["proj"], rtol=1e-4, atol=1e-5)
        for a in assigns:
            if train:
                assert_one_hot_over_groups(a)
            else:
                np.testing.assert_allclose(np.asarray(a).sum(-2), 1, atol=1e-5)
                assert ((np.asarray(a) > 0) & (np.asarray(a) < 1)).all()
        segments = segment_assignment(assigns)
        assert segments.shape == (2, 4, 16)
        np.testing.assert_allclose(np.asarray(segments).sum(-2), 1, atol=1e-5)
        assert assignment_to_pixels(segments, 4, 32).shape == (2, 4, 32, 32)
    with pytest.raises(ValueError, match="rng"):
        model.apply({"params": params}, images, train=True)


def test_groupvit_parameters_and_logical_names(groupvit):
    _, boxed, params, _ = groupvit
    assert set(params) == {"conv1", "positional_embedding", "ln_pre", "group_tokens_0", "transformer", "grouping_0",
                           "group_tokens_1", "group_projector_1", "transformer_1", "grouping_1", "transformer_2",
                           "ln_post", "proj"}
    np.testing.assert_allclose(params["group_tokens_1"], 0)  # stage 2's own tokens start at zero
    known = {name for name, _ in LOGICAL_RULES}
    boxes = jax.tree.leaves(boxed, is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))
    assert all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
    assert {n for b in boxes for n in b.names} - {None} <= known
    param_shardings(boxed, make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))  # every table shards on a real mesh


def test_bad_stage_layouts_are_errors(groupvit):
    _, _, _, images = groupvit
    for stages in [dict(STAGES, stage_depths=(2, 1)), dict(STAGES, num_group_tokens=(8, 4, 2)),
                   dict(STAGES, num_output_groups=(8,))]:
        with pytest.raises(ValueError):
            jax.eval_shape(functools.partial(GroupVisionTransformer(CONFIG, embed_dim=16, **stages).init, train=False),
                           jax.random.key(0), images)


def random_params(init, *args):
    """Random arrays with the structure and shapes of `init(*args)`'s params, without compiling the model."""
    shapes = nn.unbox(jax.eval_shape(init, jax.random.key(0), *args)["params"])
    return jax.tree.map(lambda s: RNG.normal(size=s.shape).astype(np.float32), shapes)


def _vit_params(config):
    images = jnp.zeros((1, config.image_size, config.image_size, 3))
    return random_params(VisionTransformer(config, embed_dim=16).init, images)


def test_vit_to_groupvit_copies_stage_one_and_keeps_the_rest(groupvit):
    model, _, params, images = groupvit
    vit = _vit_params(CONFIG)
    new = vit_to_groupvit_params(vit, params, stage1_depth=2)
    flat_new, flat_old, flat_vit = flatten_dict(new, sep="/"), flatten_dict(params, sep="/"), flatten_dict(vit, sep="/")
    assert flat_new.keys() == flat_old.keys()
    copied = set()
    for path, leaf in flat_new.items():
        if path == "positional_embedding":
            np.testing.assert_array_equal(leaf, flat_vit[path][1:])  # without the class token's row
        elif path.startswith(("conv1/", "ln_pre/", "transformer/resblocks_0/", "transformer/resblocks_1/")):
            np.testing.assert_array_equal(leaf, flat_vit[path])
        else:
            np.testing.assert_array_equal(leaf, flat_old[path])
            continue
        copied.add(path.split("/")[0])
    assert copied == {"positional_embedding", "conv1", "ln_pre", "transformer"}
    out, _ = jax.jit(functools.partial(model.apply, train=False))({"params": new}, images)
    assert np.isfinite(np.asarray(out.pooled)).all()


def test_vit_to_groupvit_resizes_positions_and_fills_scanned_blocks(groupvit):
    model, _, params, images = groupvit
    small = VisionConfig(**{**CONFIG.__dict__, "image_size": 16})  # a 2x2 grid
    vit = _vit_params(small)
    new = vit_to_groupvit_params(vit, params, stage1_depth=1)
    np.testing.assert_allclose(new["positional_embedding"], resize_grid_positions(vit["positional_embedding"], 4)[1:])
    np.testing.assert_array_equal(new["transformer"]["resblocks_1"]["ln_1"]["scale"],
                                  params["transformer"]["resblocks_1"]["ln_1"]["scale"])  # beyond stage1_depth: kept

    scanned = GroupVisionTransformer(CONFIG, embed_dim=16, scan_layers=True, **STAGES)
    scanned_params = random_params(functools.partial(scanned.init, train=False), images)
    vit = _vit_params(CONFIG)
    new = vit_to_groupvit_params(vit, scanned_params, stage1_depth=2)
    for i in range(2):
        for a, b in zip(jax.tree.leaves(jax.tree.map(lambda t, i=i: t[i], new["transformer"]["resblocks"])),
                        jax.tree.leaves(vit["transformer"][f"resblocks_{i}"]), strict=True):
            np.testing.assert_array_equal(a, b)

    with pytest.raises(ValueError, match="stage1_depth"):
        vit_to_groupvit_params(vit, params, stage1_depth=3)  # stage 1 has 2 blocks
    narrow = _vit_params(VisionConfig(**{**CONFIG.__dict__, "width": 16, "head_dim": 8}))
    with pytest.raises(ValueError, match="conv1"):
        vit_to_groupvit_params(narrow, params, stage1_depth=2)
