"""NegCLIP (clip_jax/methods/negclip.py): what its negatives' gradient reaches. The loss itself is tested against a
row-by-row reference in test_losses.py, its negatives in test_shapes.py and test_pipeline.py, and the method
contract (sharded steps, checkpoints, evaluation) in test_methods.py."""

import jax
import numpy as np
import pytest

from clip_jax import losses
from clip_jax.methods import get_method
from clip_jax.methods.negclip import NEGATIVE_TEXT
from clip_jax.models import flops
from clip_jax.models.clip import CLIP
from clip_jax.sharding import make_mesh

from .test_methods import BATCH, tiny_config, tokenizer  # noqa: F401 (a fixture)


def _method(negative_text_grad: bool):
    config = tiny_config("negclip")
    config.method.negative_text_grad = negative_text_grad
    return config, get_method(config)


@pytest.fixture(scope="module")
def setup(tokenizer):  # noqa: F811
    config, method = _method(True)
    batch = next(method.train_data(config, tokenizer, list(range(BATCH))))
    batch = {k: v for k, v in batch.items() if k != "stats"}
    model = method.model()
    params = model.init(jax.random.PRNGKey(0), *method.init_inputs())["params"]
    return model, params, batch


def _loss_fn(method, model):
    fns = method.step_fns(model)
    loss = losses.shard_loss(fns.loss, make_mesh({"data": 1}, jax.devices()[:1]))
    return fns, lambda params, embeddings, batch: loss({**embeddings, **fns.targets(batch)}, fns.shared(params))[0]


def test_without_the_negatives_gradient_only_their_text_pass_stops(setup):
    """`method.negative_text_grad=False`: the image tower and the temperature get the paper's gradient, and the
    text tower the paper's less exactly what reaches it through the negatives' embeddings (their pass's VJP)."""
    model, params, batch = setup
    rng = jax.random.PRNGKey(1)
    grads = {}
    for flag in (True, False):
        fns, loss = _loss_fn(_method(flag)[1], model)
        grads[flag] = jax.jit(jax.grad(lambda p, fns=fns, loss=loss: loss(p, fns.embed(p, batch, rng), batch)))(params)
    fns, loss = _loss_fn(_method(True)[1], model)
    embeddings = fns.embed(params, batch, rng)
    through_negatives = jax.grad(lambda e: loss(params, e, batch))(embeddings)[NEGATIVE_TEXT]
    _, vjp = jax.vjp(lambda p: model.apply({"params": p}, batch[NEGATIVE_TEXT], method=CLIP.encode_text), params)
    (via_negatives,) = vjp(through_negatives)
    for key in ("visual", "logit_scale"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads[True][key],
                     grads[False][key])
    text_sum = jax.tree.map(lambda a, b: a + b, grads[False]["text"], via_negatives["text"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads[True]["text"], text_sum)
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(via_negatives["text"])) > 1e-4  # not vacuous


def test_a_negative_pass_without_gradient_counts_one_forward():
    trainable = {"visual": True, "text": True}
    (config, with_grad), (_, without) = _method(True), _method(False)
    forward = flops.text_forward_flops(with_grad.model_config(), config.model.text.context_length)
    assert with_grad.flops_per_example(trainable) - without.flops_per_example(trainable) == pytest.approx(2 * forward)
