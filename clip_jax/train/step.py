"""The pure training step and its compilation with explicit shardings.

`make_train_step` builds `train_step(state, batch) -> (state, metrics)` from a method's `StepFns`
(clip_jax/methods/base.py: `embed`, `shared`, `loss`, `targets`, `log`), the optax transformation and the mask of
trainable parameters. Methods change these pieces, never the step; it names no method and no output.

The loss runs per shard (`jax.shard_map`): the per-example outputs (`embed`, `targets`) split over the batch axes,
the `shared` ones replicated, as each method declares them.

Gradient accumulation keeps the negatives of the whole batch (GradCache): pass 1 embeds every micro-batch without
gradients, the loss and its gradient w.r.t. the embeddings are computed on the full batch, and pass 2
backpropagates each micro-batch with its slice of those gradients. It gives the one-shot step's update at the
activation memory of one micro-batch (plus a second forward pass).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from clip_jax import losses
from clip_jax.methods.base import StepFns
from clip_jax.sharding import BATCH_AXES, LOGICAL_RULES, batch_sharding, param_shardings, replicated
from clip_jax.train.state import TrainState

PyTree = Any
Batch = dict[str, jax.Array]


def _split_micro(x: jax.Array, accum: int) -> jax.Array:
    """[B, ...] -> [accum, B/accum, ...] with micro-batch k = rows k, k+accum, ...: every device keeps an equal
    share of every micro-batch (a contiguous split would put whole micro-batches on few devices)."""
    x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, PartitionSpec(None, BATCH_AXES))


def _merge_micro(x: jax.Array) -> jax.Array:
    """Inverse of _split_micro: back to the original row order."""
    x = x.swapaxes(0, 1)
    x = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    return jax.lax.with_sharding_constraint(x, PartitionSpec(BATCH_AXES))


def make_train_step(
    fns: StepFns,
    tx: optax.GradientTransformation,
    trainable: PyTree,
    lr_schedule: optax.Schedule,
    mesh: Mesh,
    accum_steps: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    loss_fn = losses.shard_loss(fns.loss, mesh)

    def freeze(params):
        # Frozen parameters get no gradient at all, so XLA drops their backward computation.
        return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)

    def one_shot(params, batch, rng):
        def loss_of(p):
            p = freeze(p)
            return loss_fn({**fns.embed(p, batch, rng), **fns.targets(batch)}, fns.shared(p))

        return jax.value_and_grad(loss_of, has_aux=True)(params)

    def accumulated(params, batch, rng):
        micro = jax.tree.map(lambda x: _split_micro(x, accum_steps), batch)
        micro_rngs = jax.vmap(functools.partial(jax.random.fold_in, rng))(jnp.arange(accum_steps))
        frozen_params = jax.lax.stop_gradient(params)
        # Pass 1: embeddings of every micro-batch, no gradients kept.
        embeds = jax.lax.map(lambda x: fns.embed(frozen_params, *x), (micro, micro_rngs))
        embeds = jax.tree.map(_merge_micro, embeds)

        # The loss on the whole batch, differentiated w.r.t. the embeddings and the shared outputs' parameters.
        def loss_of(p, e):
            return loss_fn({**e, **fns.targets(batch)}, fns.shared(freeze(p)))

        (loss, metrics), (grads, embed_grads) = jax.value_and_grad(loss_of, argnums=(0, 1), has_aux=True)(
            params, embeds
        )
        embed_grads = jax.tree.map(lambda g: _split_micro(g, accum_steps), embed_grads)

        # Pass 2: backpropagate each micro-batch with its slice of the embedding gradients (the same rng as pass 1,
        # so a stochastic forward is recomputed as it was).
        def backward(acc, inputs):
            mb, mb_rng, cotangent = inputs
            _, vjp = jax.vjp(lambda p: fns.embed(freeze(p), mb, mb_rng), params)
            return jax.tree.map(jnp.add, acc, vjp(cotangent)[0]), None

        grads, _ = jax.lax.scan(backward, grads, (micro, micro_rngs, embed_grads))
        return (loss, metrics), grads

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng, step_rng = jax.random.split(state.rng)
        grad_fn = one_shot if accum_steps == 1 else accumulated
        (loss, metrics), grads = grad_fn(state.params, batch, step_rng)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A non-finite loss or gradient skips the update: parameters and optimizer state stay as they were.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            rng=rng,
        )
        if taken := sorted(set(metrics) & {"loss", "grad_norm", "lr", "nonfinite"}):  # (traced once: a method's bug)
            raise ValueError(f"the method's loss returned the metrics {taken}, names the trainer logs itself: name "
                             "them otherwise (loss_<part> for a part of the loss, which curves.png draws)")
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr_schedule(state.step),
            **fns.log(fns.shared(state.params)),
            "nonfinite": (~finite).astype(jnp.int32),
        }
        return new_state, metrics

    return train_step


def state_shardings(boxed_params: PyTree, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """Shardings of the whole train state: parameters by their logical axes, optimizer moments like their
    parameters, counters replicated."""
    params = param_shardings(boxed_params, mesh)
    abstract_params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(boxed_params)
    )
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    # Frozen parameters (optax.multi_transform + set_to_zero) have MaskedNode placeholders: keep them as they are.
    masked = lambda x: isinstance(x, optax.MaskedNode)
    opt = optax.tree_map_params(
        tx,
        lambda leaf, s: leaf if masked(leaf) else s,
        abstract_opt,
        params,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=masked,
    )
    return TrainState(step=replicated(mesh), params=params, opt_state=opt, rng=replicated(mesh))


def compile_train_step(
    train_step: Callable,
    shardings: TrainState,
    abstract_state: TrainState,
    abstract_batch: Batch,
    mesh: Mesh,
):
    """Ahead-of-time compilation with explicit shardings; the state is donated (updated in place)."""
    jitted = jax.jit(
        train_step,
        in_shardings=(shardings, batch_sharding(mesh)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=(0,),
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        return jitted.lower(abstract_state, abstract_batch).compile()
