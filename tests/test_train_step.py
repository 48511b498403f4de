"""One compiled training step on a tiny model: sharded == single device, gradient accumulation == one shot,
frozen parameters untouched, non-finite updates skipped."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.config import default_config, method_config
from clip_jax.errors import ConfigError
from clip_jax.methods import get_method
from clip_jax.methods.base import StepFns, abstract_batch
from clip_jax.sharding import batch_sharding, global_batch, make_mesh
from clip_jax.train import state as state_lib
from clip_jax.train import step as step_lib

BATCH, IMAGE, CONTEXT, VOCAB = 16, 32, 12, 64


def tiny_model_dict():
    tower = dict(width=32, layers=1, heads=2, head_dim=16, mlp_dim=64, activation="gelu")
    return {
        "vision": dict(tower, type="vit", patch_size=16, image_size=IMAGE),
        "text": dict(tower, type="transformer", vocab_size=VOCAB, context_length=CONTEXT),
        "embed_dim": 16,
    }


def make_batch(seed=0, dropout_keys=None):
    """`dropout_keys`: the seed of each example's key for patch dropout and stochastic depth (the `dropout_key`
    field), None for none."""
    rng = np.random.default_rng(seed)
    text = rng.integers(1, VOCAB - 1, size=(BATCH, CONTEXT)).astype(np.int32)
    text[:, -3] = VOCAB - 1  # end-of-text (largest id)
    text[:, -2:] = 0
    text[4] = text[5]  # a repeated caption
    image = rng.integers(0, 256, size=(BATCH, IMAGE, IMAGE, 3)).astype(np.uint8)
    if dropout_keys is None:
        return {"image": image, "text": text}
    keys = np.random.default_rng([dropout_keys, seed]).integers(0, 2**32, size=(BATCH, 2), dtype=np.uint32)
    return {"image": image, "text": text, "dropout_key": keys}


def run_steps(mesh_sizes, accum_steps=1, frozen=(), n_steps=2, devices=None, vision=None, key_seed=0):
    """`vision`: overrides of the tiny model's image tower (patch dropout, stochastic depth)."""
    config = default_config()
    config.optimizer.frozen = frozen
    config.optimizer.warmup_steps = 1
    config.optimizer.lr = 1e-2
    config.model = tiny_model_dict()
    config.model.vision.update(vision or {})
    config.method = method_config("clip", multi_positive=True)
    mesh = make_mesh(mesh_sizes, devices)
    method = get_method(config)
    model = method.model()
    batch = make_batch()
    boxed = jax.eval_shape(model.init, jax.random.key(0), batch["image"][:1], batch["text"][:1])["params"]
    params = nn.unbox(model.init(jax.random.key(0), batch["image"][:1], batch["text"][:1])["params"])
    start = jax.tree.map(np.array, params)  # a host copy: the device arrays are donated to the step
    tx = state_lib.make_optimizer(config.optimizer, 10, params)
    shardings = step_lib.state_shardings(boxed, tx, mesh)
    state = jax.device_put(state_lib.init_state(params, tx, jax.random.key(1)), shardings)
    train_step = step_lib.make_train_step(
        method.step_fns(model), tx, state_lib.trainable_mask(params, frozen),
        state_lib.learning_rate_schedule(config.optimizer, 10), mesh, accum_steps,
    )
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    compiled = step_lib.compile_train_step(
        train_step, shardings, abstract_state, abstract_batch(method.fields(), BATCH, batch_sharding(mesh)), mesh
    )
    metrics = []
    for i in range(n_steps):
        b = make_batch(i, key_seed if "dropout_key" in method.fields() else None)
        gb = global_batch(b, mesh)
        state, m = compiled(state, gb)
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics, start


def assert_trees_close(a, b, rtol, atol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=str(path))


@pytest.fixture(scope="module")
def single_device_run():
    return run_steps({"data": 1}, devices=jax.devices()[:1])


def test_sharded_step_equals_single_device(single_device_run):
    want, want_metrics, _ = single_device_run
    got, got_metrics, _ = run_steps({"data": 2, "fsdp": 2, "tensor": 2})
    np.testing.assert_allclose(got_metrics[0]["loss"], want_metrics[0]["loss"], rtol=1e-5)
    np.testing.assert_allclose(got_metrics[0]["grad_norm"], want_metrics[0]["grad_norm"], rtol=1e-5)
    # Adam divides by sqrt(v): float rounding of near-zero gradients moves a parameter by up to ~1e-5 at lr 1e-2.
    assert_trees_close(got.params, want.params, rtol=1e-4, atol=2e-5)


def test_gradient_accumulation_equals_one_shot(single_device_run):
    want, want_metrics, start = single_device_run
    got, got_metrics, _ = run_steps({"data": 4, "fsdp": 2}, accum_steps=2)
    np.testing.assert_allclose(got_metrics[1]["loss"], want_metrics[1]["loss"], rtol=1e-5)
    np.testing.assert_allclose(got_metrics[0]["grad_norm"], want_metrics[0]["grad_norm"], rtol=1e-5)
    assert_trees_close(got.params, want.params, rtol=1e-4, atol=2e-5)
    # and the step did move the parameters (the comparison above is not between two untouched trees)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), got.params, start)
    assert max(jax.tree.leaves(moved)) > 1e-3


@pytest.mark.parametrize("vision", [{"patch_dropout": 0.5}, {"stochastic_depth": 0.5, "layers": 2}],
                         ids=["patch_dropout", "stochastic_depth"])
def test_the_step_drops_image_parts_by_each_examples_key(vision):
    """Each image keeps 2 of its 4 patches, or skips residual branches of the second block, drawn from its
    `dropout_key`: the loss differs from the step's without them on the same batch, and with other keys.
    (tests/test_methods.py checks that the draws are the same on any mesh and accumulation.)"""
    one = dict(devices=jax.devices()[:1], n_steps=1)
    _, plain, _ = run_steps({"data": 1}, vision={k: v for k, v in vision.items() if k == "layers"}, **one)
    _, dropped, _ = run_steps({"data": 1}, vision=vision, **one)
    _, other_keys, _ = run_steps({"data": 1}, vision=vision, key_seed=1, **one)
    assert abs(float(dropped[0]["loss"]) - float(plain[0]["loss"])) > 1e-3
    assert abs(float(dropped[0]["loss"]) - float(other_keys[0]["loss"])) > 1e-3


def test_frozen_parameters_do_not_change_and_have_no_optimizer_state():
    got, _, start = run_steps({"data": 8}, frozen=(r"^visual/",), n_steps=2)  # step 0 has lr 0 (warm-up)
    assert_trees_close(got.params["visual"], start["visual"], rtol=0, atol=0)
    assert np.abs(np.asarray(got.params["text"]["text_projection"]) - start["text"]["text_projection"]).max() > 0
    # Optimizer moments exist for the text tower only.
    sizes = sum(x.size for x in jax.tree.leaves(got.opt_state))
    n_text = sum(x.size for x in jax.tree.leaves(start["text"])) + 1  # + logit_scale
    assert sizes < 2 * n_text + 100


def test_frozen_rule_that_matches_nothing_is_an_error_naming_the_group_meant():
    with pytest.raises(ConfigError, match=r"rule '\^vision/' matches no parameter \(did you mean '\^visual/'\?\)"):
        run_steps({"data": 8}, frozen=(r"^vision/",), n_steps=1)


@pytest.mark.parametrize("rule, said", [
    (r"^text/positional_embeding$", r" (did you mean '^text/positional_embedding$'?);"),  # anchors kept
    ("ln_fnal", " (did you mean 'ln_final'?);"),  # a name anywhere in a path
    ("^txt/positional_embeding$", " (did you mean '^text/positional_embedding$'?);"),
    (r"^txt/.*embeding", " (the closest paths: 'text/positional_embedding', 'text/positional_embedding_res');"),
    ("zzzz", " matches no parameter; fix it"),  # nothing close: no guess (it was the first path, 'logit_scale')
    ("(", "is not a valid regex"),
])
def test_a_rule_that_matches_nothing_names_the_closest_parameter_paths(rule, said):
    params = {"logit_scale": 0, "text": {"positional_embedding": 0, "positional_embedding_res": 0,
                                         "ln_final": {"scale": 0}}, "visual": {"ln_pre": {"scale": 0}}}
    with pytest.raises(ConfigError) as info:
        state_lib.check_patterns(params, [rule], "optimizer.frozen")
    assert str(info.value).startswith(f"optimizer.frozen rule {rule!r} ") and said in str(info.value), info.value
    assert "--config.optimizer.frozen" in str(info.value)


def test_a_method_metric_named_as_the_trainers_own_is_refused():
    """A method's metric named "lr" or "loss" was overwritten by the trainer's, without a word."""
    import optax

    mesh = make_mesh({"data": 8})

    def loss(outputs, *, axis_name):
        mean = jax.lax.pmean(outputs["x"].mean(), axis_name)
        return mean, {"lr": mean}

    fns = StepFns(embed=lambda params, batch, rng: {"x": batch["x"] * params["w"]}, shared=lambda params: {},
                  loss=loss)
    tx = optax.sgd(0.1)
    params = {"w": jnp.ones(())}
    step = step_lib.make_train_step(fns, tx, {"w": True}, lambda count: 0.1, mesh, 1)
    with pytest.raises(ValueError, match=r"returned the metrics \['lr'\], names the trainer logs itself"):
        jax.eval_shape(step, state_lib.init_state(params, tx, jax.random.key(0)), {"x": jnp.ones((8, 2))})
