"""The pure training step and its compilation with explicit shardings.

`make_train_step` builds `train_step(state, batch) -> (state, metrics)` from four pluggable pieces:
- `embed_fn(params, batch) -> {name: [B, ...]}`: per-example outputs of the towers (CLIP: `image`, `text`, and
  `short_text` when the batch has it);
- `scalars_fn(params) -> {name: scalar}`: parameters the loss uses directly (`logit_scale`, `logit_bias`);
- `loss_fn(outputs) -> (loss, metrics)`: a global-array loss, usually `clip_jax.losses.shard_loss(...)`;
- the optax transformation and the mask of trainable parameters.
Methods change these pieces, never the step.

Gradient accumulation keeps the negatives of the whole batch (GradCache): pass 1 embeds every micro-batch without
gradients, the loss and its gradient w.r.t. the embeddings are computed on the full batch, and pass 2
backpropagates each micro-batch with its slice of those gradients. It gives the one-shot step's update at the
activation memory of one micro-batch (plus a second forward pass).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from clip_jax.losses import caption_key
from clip_jax.models.clip import CLIP
from clip_jax.sharding import BATCH_AXES, LOGICAL_RULES, batch_sharding, param_shardings, replicated
from clip_jax.train.state import TrainState

PyTree = Any
Batch = dict[str, jax.Array]


# Token fields of a batch that the text tower encodes, when present: `text` always, `short_text` for Long-CLIP.
TEXT_FIELDS = ("text", "short_text")


def clip_embed_fn(model: CLIP) -> Callable[[PyTree, Batch], dict[str, jax.Array]]:
    def embed(params, batch):
        variables = {"params": params}
        out = {"image": model.apply(variables, batch["image"], method=CLIP.encode_image)}
        for field in TEXT_FIELDS:
            if field in batch:
                out[field] = model.apply(variables, batch[field], method=CLIP.encode_text)
        return out

    return embed


def clip_scalars_fn(model: CLIP) -> Callable[[PyTree], dict[str, jax.Array]]:
    def scalars(params):
        scale, bias = model.apply({"params": params}, method=CLIP.temperature)
        return {"logit_scale": scale, "logit_bias": bias}

    return scalars


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
    embed_fn: Callable[[PyTree, Batch], dict[str, jax.Array]],
    scalars_fn: Callable[[PyTree], dict[str, jax.Array]],
    loss_fn: Callable[[dict[str, jax.Array]], tuple[jax.Array, dict]],
    tx: optax.GradientTransformation,
    trainable: PyTree,
    lr_schedule: optax.Schedule,
    accum_steps: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    def freeze(params):
        # Frozen parameters get no gradient at all, so XLA drops their backward computation.
        return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)

    def batch_extras(batch):
        # `caption_key` of `text`, `short_caption_key` of `short_text`
        return {f"{f.removesuffix('text')}caption_key": caption_key(batch[f]) for f in TEXT_FIELDS if f in batch}

    def one_shot(params, batch):
        def loss_of(p):
            p = freeze(p)
            outputs = {**embed_fn(p, batch), **scalars_fn(p), **batch_extras(batch)}
            return loss_fn(outputs)

        return jax.value_and_grad(loss_of, has_aux=True)(params)

    def accumulated(params, batch):
        micro = jax.tree.map(lambda x: _split_micro(x, accum_steps), batch)
        frozen_params = jax.lax.stop_gradient(params)
        # Pass 1: embeddings of every micro-batch, no gradients kept.
        embeds = jax.lax.map(lambda mb: embed_fn(frozen_params, mb), micro)
        embeds = jax.tree.map(_merge_micro, embeds)

        # The loss on the whole batch, differentiated w.r.t. the embeddings and the scalar parameters.
        def loss_of(p, e):
            outputs = {**e, **scalars_fn(freeze(p)), **batch_extras(batch)}
            return loss_fn(outputs)

        (loss, metrics), (grads, embed_grads) = jax.value_and_grad(loss_of, argnums=(0, 1), has_aux=True)(
            params, embeds
        )
        embed_grads = jax.tree.map(lambda g: _split_micro(g, accum_steps), embed_grads)

        # Pass 2: backpropagate each micro-batch with its slice of the embedding gradients.
        def backward(acc, inputs):
            mb, cotangent = inputs
            _, vjp = jax.vjp(lambda p: embed_fn(freeze(p), mb), params)
            return jax.tree.map(jnp.add, acc, vjp(cotangent)[0]), None

        grads, _ = jax.lax.scan(backward, grads, (micro, embed_grads))
        return (loss, metrics), grads

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng, _ = jax.random.split(state.rng)
        grad_fn = one_shot if accum_steps == 1 else accumulated
        (loss, metrics), grads = grad_fn(state.params, batch)
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
        scalars = scalars_fn(state.params)
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr_schedule(state.step),
            "logit_scale": scalars["logit_scale"],
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


def abstract_batch(batch_size: int, image_size: int, context_length: int, mesh: Mesh,
                   short_context_length: int | None = None) -> Batch:
    """The batch the step is compiled for; with `short_context_length`, a `short_text` field too."""
    sharding = batch_sharding(mesh)
    batch = {
        "image": jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.uint8, sharding=sharding),
        "text": jax.ShapeDtypeStruct((batch_size, context_length), jnp.int32, sharding=sharding),
    }
    if short_context_length is not None:
        batch["short_text"] = jax.ShapeDtypeStruct((batch_size, short_context_length), jnp.int32, sharding=sharding)
    return batch
