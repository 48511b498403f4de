"""Contrastive losses, written for the devices' local shards and run inside `jax.shard_map`.

A loss is a function `loss_fn(outputs, *, axis_name, **hparams) -> (loss, metrics)`. `outputs` holds the
local rows of per-example arrays (`image`, `text` embeddings, L2-normalised; `caption_key`, ...) and the replicated
scalars (`logit_scale`, `logit_bias`). It returns the loss of the *global* batch, identical on every device, so
that its gradient equals that of the single-device computation. A method (clip_jax/methods/) binds its loss's
hyperparameters; `shard_loss` runs it on global arrays. Long-CLIP's loss also reads the embeddings of a second
text field, `short_text`.

Each device scores its local rows against the all-gathered other side (open_clip's `--local-loss
--gather-with-grad`): memory grows with B_local * B_global, not B_global^2. `all_gather`'s transpose is a
reduce-scatter, so the gradients of remote rows flow back to the device that owns them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from clip_jax.models.boxes import giou_loss
from clip_jax.sharding import BATCH_AXES

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]

# Fixed odd multipliers for hashing token rows: identical captions get identical keys.
_HASH_MULTIPLIERS = np.random.default_rng(20240101).integers(1, 2**32, size=4096, dtype=np.uint64) | 1


def caption_key(tokens: jax.Array) -> jax.Array:
    """A uint32 hash of each row of token ids; equal captions -> equal keys (collisions ~ B^2 / 2^32)."""
    mult = jnp.asarray(_HASH_MULTIPLIERS[: tokens.shape[-1]].astype(np.uint32))
    return jnp.sum(tokens.astype(jnp.uint32) * mult, axis=-1, dtype=jnp.uint32)


def _positives(outputs: dict[str, jax.Array], offset: jax.Array, n_global: int, gathered_keys: jax.Array | None
               ) -> jax.Array:
    """Float [b_local, n_global] matrix of positives: the diagonal, or every pair with an identical caption."""
    b_local = outputs["image"].shape[0]
    if gathered_keys is not None:
        return (outputs["caption_key"][:, None] == gathered_keys[None, :]).astype(jnp.float32)
    return jax.nn.one_hot(offset + jnp.arange(b_local), n_global, dtype=jnp.float32)


def _soft_cross_entropy(logits: jax.Array, positives: jax.Array, label_smoothing: float,
                        valid: jax.Array | None = None) -> jax.Array:
    """Cross-entropy against the positives' uniform distribution; `valid` (bool, as `logits`): the columns that are
    candidates at all (the others take no smoothing mass; their logits must be masked already)."""
    targets = positives / positives.sum(-1, keepdims=True)
    if label_smoothing:
        spread = 1.0 / logits.shape[-1] if valid is None else valid / valid.sum(-1, keepdims=True)
        targets = targets * (1.0 - label_smoothing) + label_smoothing * spread
    return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def clip_loss(
    outputs: dict[str, jax.Array],
    *,
    axis_name,
    label_smoothing: float = 0.0,
    multi_positive: bool = False,
    image_key: str = "image",
    text_key: str = "text",
    negative_key: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE: (CE(s I T^T) + CE(s T I^T)) / 2 averaged over the global batch.

    multi_positive: captions that are identical (same `caption_key`) count as positives of each other, with the
    target mass split between them; without it a repeated caption is a false negative.
    negative_key: the embeddings of captions that match no image (NegCLIP's hard negatives, one per example), added
    to every image's candidates in the image-to-text term, as NegCLIP adds them to the batch's texts; one that is
    identical to an image's own caption (`negative_caption_key` equal to its `caption_key`) is no negative of it,
    and is left out of its candidates. The text-to-image term is CLIP's.
    """
    image, text = outputs[image_key], outputs[text_key]
    scale = outputs["logit_scale"]
    b_local = image.shape[0]
    all_image = jax.lax.all_gather(image, axis_name, tiled=True)
    all_text = jax.lax.all_gather(text, axis_name, tiled=True)
    n_global = all_image.shape[0]
    offset = jax.lax.axis_index(axis_name) * b_local
    keys = jax.lax.all_gather(outputs["caption_key"], axis_name, tiled=True) if multi_positive else None
    positives = _positives(outputs, offset, n_global, keys)
    logits_i2t = scale * image @ all_text.T
    logits_t2i = scale * text @ all_image.T
    valid, metrics = None, {}
    if negative_key is not None:
        all_negative = jax.lax.all_gather(outputs[negative_key], axis_name, tiled=True)
        negative_keys = jax.lax.all_gather(outputs["negative_caption_key"], axis_name, tiled=True)
        distinct = outputs["caption_key"][:, None] != negative_keys[None, :]
        # A large finite value, not -inf: the targets' zeros times -inf would be NaN in the cross-entropy.
        negative_logits = jnp.where(distinct, scale * image @ all_negative.T, -1e9)
        # Of the images whose own negative differs from their caption, the share that score their caption above it:
        # whether the negatives are being learnt
        rows, own = jnp.arange(b_local), offset + jnp.arange(b_local)
        differs, beats = distinct[rows, own], logits_i2t[rows, own] > negative_logits[rows, own]
        counts = jax.lax.psum(jnp.stack([jnp.sum(beats & differs), jnp.sum(differs)]), axis_name)
        metrics["hard_negative_acc"] = counts[0] / jnp.maximum(counts[1], 1)
        logits_i2t = jnp.concatenate([logits_i2t, negative_logits], axis=-1)
        positives = jnp.concatenate([positives, jnp.zeros_like(negative_logits)], axis=-1)
        valid = jnp.concatenate([jnp.ones_like(distinct), distinct], axis=-1)
    ce = _soft_cross_entropy(logits_i2t, positives, label_smoothing, valid) + _soft_cross_entropy(
        logits_t2i, positives[:, :n_global], label_smoothing
    )
    loss = jax.lax.psum(ce.sum(), axis_name) / (2 * n_global)
    hit = jnp.take_along_axis(positives, jnp.argmax(logits_i2t, -1)[:, None], axis=-1)
    metrics["i2t_acc"] = jax.lax.psum(hit.sum(), axis_name) / n_global
    return loss, metrics


def siglip_loss(outputs: dict[str, jax.Array], *, axis_name, multi_positive: bool = False
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sigmoid loss, all-gather form: -1/N sum_i sum_j log_sigmoid(z_ij (t <I_i, T_j> + b)), z = +1 on positives."""
    image, text = outputs["image"], outputs["text"]
    b_local = image.shape[0]
    all_text = jax.lax.all_gather(text, axis_name, tiled=True)
    n_global = all_text.shape[0]
    offset = jax.lax.axis_index(axis_name) * b_local
    keys = jax.lax.all_gather(outputs["caption_key"], axis_name, tiled=True) if multi_positive else None
    z = 2.0 * _positives(outputs, offset, n_global, keys) - 1.0
    logits = outputs["logit_scale"] * image @ all_text.T + outputs["logit_bias"]
    loss = -jax.lax.psum(jax.nn.log_sigmoid(z * logits).sum(), axis_name) / n_global
    return loss, {}


def siglip_ring_loss(outputs: dict[str, jax.Array], *, axis_name, multi_positive: bool = False
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sigmoid loss with text blocks passed around a ring of devices (`ppermute`): each device only ever holds
    one remote block, never the gathered text embeddings. Same value and gradients as `siglip_loss`."""
    image, text = outputs["image"], outputs["text"]
    b_local = image.shape[0]
    n_dev = jax.lax.axis_size(axis_name)
    rank = jax.lax.axis_index(axis_name)
    scale, bias = outputs["logit_scale"], outputs["logit_bias"]
    ring = [(i, (i + 1) % n_dev) for i in range(n_dev)]
    key = outputs["caption_key"] if multi_positive else None

    def block_loss(text_block, key_block, source_rank):
        logits = scale * image @ text_block.T + bias
        if multi_positive:
            positive = outputs["caption_key"][:, None] == key_block[None, :]
        else:
            positive = (jnp.arange(b_local)[:, None] == jnp.arange(b_local)[None, :]) & (source_rank == rank)
        z = jnp.where(positive, 1.0, -1.0)
        return jax.nn.log_sigmoid(z * logits).sum()

    def step(carry, k):
        text_block, key_block, total = carry
        source = (rank - k) % n_dev  # after k shifts we hold the block that started on device rank - k
        total = total + block_loss(text_block, key_block, source)
        text_block = jax.lax.ppermute(text_block, axis_name, ring)
        if multi_positive:
            key_block = jax.lax.ppermute(key_block, axis_name, ring)
        return (text_block, key_block, total), None

    # Carries must be typed as varying over the ring's axes, like the per-device values they will hold.
    vary = functools.partial(jax.lax.pcast, axis_name=axis_name, to="varying")
    key0 = key if multi_positive else vary(jnp.zeros((b_local,), jnp.uint32))
    init = (text, key0, vary(jnp.zeros((), jnp.float32)))
    # The last ppermute's result is unused; XLA drops it.
    (_, _, total), _ = jax.lax.scan(step, init, jnp.arange(n_dev))
    loss = -jax.lax.psum(total, axis_name) / (b_local * n_dev)
    return loss, {}


_HIGHEST = jax.lax.Precision.HIGHEST  # PCA in full float32 (TPU/GPU default matmuls round f32 inputs to bf16/tf32)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def top_k_projector(gram: jax.Array, k: int) -> jax.Array:
    """U_k U_k^T: the orthogonal projector onto the eigenvectors of the k largest eigenvalues of a symmetric matrix.

    Differentiated by its own rule (below) rather than through the eigenvectors (or an SVD), whose derivatives
    divide by every eigenvalue difference: near-equal eigenvalues *inside* the kept (or the discarded) set, and
    the zero singular values of a centred batch no larger than the feature size, make those terms inf and the
    gradient NaN, although the projector itself does not depend on them. The reference hits this too ("SVD may
    encounter infs"). The projector's derivative only involves kept-discarded pairs:
    dQ = U (F * U^T dG U) U^T with F_ij = 1 / (l_i - l_j) for i kept and j discarded (and its transpose), 0
    elsewhere; it is finite whenever the k-th and (k+1)-th eigenvalues differ, when the subspace is well defined.
    """
    _, vectors = jnp.linalg.eigh(gram)
    top = vectors[:, gram.shape[0] - k :]
    return jnp.matmul(top, top.T, precision=_HIGHEST)


@top_k_projector.defjvp
def _top_k_projector_jvp(k: int, primals, tangents):
    (gram,), (d_gram,) = primals, tangents
    values, vectors = jnp.linalg.eigh(gram)  # ascending: the last k are kept
    n = gram.shape[0]
    kept = jnp.arange(n) >= n - k
    cross = kept[:, None] != kept[None, :]
    # A vanishing gap between the k-th and (k+1)-th eigenvalues leaves the subspace undefined; the floor keeps the
    # gradient finite there (its direction is then arbitrary, as the subspace is).
    gap = jnp.maximum(jnp.abs(values[:, None] - values[None, :]), 1e-6 * jnp.maximum(values[-1], 1e-30))
    f = jnp.where(cross, 1.0 / gap, 0.0)
    top = vectors[:, n - k :]
    dot = functools.partial(jnp.matmul, precision=_HIGHEST)
    d_proj = dot(dot(vectors, f * dot(dot(vectors.T, d_gram), vectors)), vectors.T)
    return dot(top, top.T), d_proj


def pca_reconstruct(x: jax.Array, k: int) -> jax.Array:
    """Long-CLIP's coarse features: rows of x [B, D] centred by their mean, projected onto the top-k principal
    components (right singular vectors V_k of the centred batch) and un-centred, X_c V_k V_k^T + mean. Not
    re-normalised. X_c V_k V_k^T = U_k U_k^T X_c, so the projector comes from the smaller Gram matrix:
    X_c X_c^T [B, B] or X_c^T X_c [D, D]."""
    x = x.astype(jnp.float32)
    mean = x.mean(axis=0, keepdims=True)
    centred = x - mean
    dot = functools.partial(jnp.matmul, precision=_HIGHEST)
    if x.shape[0] <= x.shape[1]:
        return dot(top_k_projector(dot(centred, centred.T), k), centred) + mean
    return dot(centred, top_k_projector(dot(centred.T, centred), k)) + mean


def longclip_loss(
    outputs: dict[str, jax.Array],
    *,
    axis_name,
    label_smoothing: float = 0.1,
    long_weight: float = 1.0,
    short_weight: float = 1.0,
    pca_components: int = 32,
    pca_scope: str = "local",
    multi_positive: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Long-CLIP (arXiv 2403.15378): long_weight * CLIP(fine image, long text) + short_weight * CLIP(coarse image,
    short text), where coarse = `pca_reconstruct` of the fine image embeddings over the device's local batch
    (pca_scope "local", as the reference) or over the all-gathered global batch ("global"). Needs the `short_text`
    embeddings (and, with multi_positive, `short_caption_key`)."""
    image = outputs["image"]
    if pca_scope == "local":
        coarse = pca_reconstruct(image, pca_components)
    elif pca_scope == "global":
        b_local = image.shape[0]
        coarse = pca_reconstruct(jax.lax.all_gather(image, axis_name, tiled=True), pca_components)
        coarse = jax.lax.dynamic_slice_in_dim(coarse, jax.lax.axis_index(axis_name) * b_local, b_local)
    else:
        raise ValueError(f"pca_scope must be 'local' or 'global', got {pca_scope!r}")
    clip = functools.partial(clip_loss, axis_name=axis_name, label_smoothing=label_smoothing,
                             multi_positive=multi_positive)
    long_loss, metrics = clip(outputs)
    short = {**outputs, "image": coarse, "text": outputs["short_text"]}
    if multi_positive:
        short["caption_key"] = outputs["short_caption_key"]
    short_loss, _ = clip(short)
    loss = long_weight * long_loss + short_weight * short_loss
    return loss, {**metrics, "loss_long": long_loss, "loss_short": short_loss}


def classification_loss(outputs: dict[str, jax.Array], *, axis_name, label_smoothing: float = 0.0
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-entropy of per-example class scores `logits` [B, C] against the class index `label` [B], averaged over
    the global batch (the few-shot methods); with `label_smoothing` e, against (1 - e) one-hot + e / C. Metric
    `train_acc`, the top-1 accuracy of the batch."""
    logits, label = outputs["logits"].astype(jnp.float32), outputs["label"]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(log_probs, label[:, None], axis=-1)[:, 0]
    if label_smoothing:
        ce = (1.0 - label_smoothing) * ce - label_smoothing * log_probs.mean(axis=-1)
    n_global = jax.lax.psum(label.shape[0], axis_name)
    hits = (jnp.argmax(logits, axis=-1) == label).sum()
    return jax.lax.psum(ce.sum(), axis_name) / n_global, {"train_acc": jax.lax.psum(hits, axis_name) / n_global}


def multi_label_loss(outputs: dict[str, jax.Array], *, axis_name, multi_positive: bool = False
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GroupViT's multi-label contrastive loss: each image `image` [b, D] against the K prompts of every example of
    the global batch, `prompts` [b, K, D] (per-object phrases), at the temperature `multi_label_scale`.

    Image to prompts: a softmax over all N*K prompts with target 1/K on the image's own K (soft cross-entropy); prompts
    to images: each prompt's cross-entropy against its own image; the loss is the mean of the two directions' means.
    multi_positive: prompts with identical tokens (`prompt_key` [b, K]) count as the same prompt, so an image's
    targets include every copy of its prompts and a prompt's targets every image that has it (shapes repeats phrases
    across a batch; without it, each repeat is a false negative)."""
    image, prompts, scale = outputs["image"], outputs["prompts"], outputs["multi_label_scale"]
    b_local, k = prompts.shape[:2]
    all_image = jax.lax.all_gather(image, axis_name, tiled=True)
    all_prompts = jax.lax.all_gather(prompts, axis_name, tiled=True).reshape(-1, prompts.shape[-1])
    n_global = all_image.shape[0]
    offset = jax.lax.axis_index(axis_name) * b_local
    rows = offset + jnp.arange(b_local)
    if multi_positive:
        keys = outputs["prompt_key"]
        all_keys = jax.lax.all_gather(keys, axis_name, tiled=True)  # [N, K]
        image_pos = (keys[:, :, None] == all_keys.reshape(-1)[None, None, :]).any(axis=1)  # [b, N*K]
        prompt_pos = (keys.reshape(-1)[:, None, None] == all_keys[None, :, :]).any(axis=-1)  # [b*K, N]
    else:
        image_pos = jnp.repeat(jax.nn.one_hot(rows, n_global, dtype=bool), k, axis=1)  # own prompts: n*K .. n*K+K-1
        prompt_pos = jnp.repeat(jax.nn.one_hot(rows, n_global, dtype=bool), k, axis=0)
    logits_i2p = scale * image @ all_prompts.T
    logits_p2i = scale * prompts.reshape(-1, prompts.shape[-1]) @ all_image.T
    ce_i2p = _soft_cross_entropy(logits_i2p, image_pos.astype(jnp.float32), 0.0)
    ce_p2i = _soft_cross_entropy(logits_p2i, prompt_pos.astype(jnp.float32), 0.0)
    loss = (jax.lax.psum(ce_i2p.sum(), axis_name) / n_global
            + jax.lax.psum(ce_p2i.sum(), axis_name) / (n_global * k)) / 2
    return loss, {}


def pixel_cross_entropy(outputs: dict[str, jax.Array], *, axis_name, ignore: int = 255
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-entropy of per-pixel label scores `pixel_logits` [B, H, W, L] against the label map `seg` [B, H, W],
    averaged over the labelled pixels of the global batch (pixels labelled `ignore` count for nothing; a batch with
    none gives 0). Metric `pixel_acc`, the top-1 accuracy over those pixels (the dense methods)."""
    logits, seg = outputs["pixel_logits"].astype(jnp.float32), outputs["seg"].astype(jnp.int32)
    valid = seg != ignore
    target = jnp.where(valid, seg, 0)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(log_probs, target[..., None], axis=-1)[..., 0]
    count = jnp.maximum(jax.lax.psum(valid.sum(), axis_name), 1)
    hits = ((jnp.argmax(logits, axis=-1) == target) & valid).sum()
    loss = jax.lax.psum(jnp.where(valid, ce, 0.0).sum(), axis_name) / count
    return loss, {"pixel_acc": jax.lax.psum(hits, axis_name) / count}


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, alpha: float = 0.25, gamma: float = 2.0
                       ) -> jax.Array:
    """RetinaNet's focal loss, elementwise: binary cross-entropy of `logits` against 0/1 `targets`, scaled by
    (1 - p_t)^gamma (easy examples count less) and alpha on positives, 1 - alpha on negatives (alpha < 0: none)."""
    logits, targets = logits.astype(jnp.float32), targets.astype(jnp.float32)
    p = jax.nn.sigmoid(logits)
    ce = -(targets * jax.nn.log_sigmoid(logits) + (1 - targets) * jax.nn.log_sigmoid(-logits))
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def detection_loss(outputs: dict[str, jax.Array], *, axis_name, l1_weight: float = 5.0, giou_weight: float = 2.0,
                   focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The one-stage part of the detection methods, per patch of the image grid: `patch_logits` [B, P, K] scored
    with the focal loss against `patch_targets` [B, P, K] (0/1; entries where `patch_valid` [B, P, K] is False count
    for nothing: a prompt's padding slots), and the boxes `patch_boxes` [B, P, 4] (normalised xyxy) of the patches
    an object is assigned to (`target_boxes` [B, P, 4], `assigned` [B, P]) regressed with L1 (summed over the four
    coordinates) + GIoU. Every term is summed over the global batch and divided by its number of assigned patches
    (RetinaNet's and DETR's normaliser; at least 1). Metrics: `loss_focal`, `loss_l1`, `loss_giou`, `box_giou` (the
    mean GIoU of the assigned patches' boxes with their targets)."""
    assigned = outputs["assigned"].astype(jnp.float32)
    count = jnp.maximum(jax.lax.psum(assigned.sum(), axis_name), 1.0)
    focal = sigmoid_focal_loss(outputs["patch_logits"], outputs["patch_targets"], focal_alpha, focal_gamma)
    focal = jnp.where(outputs["patch_valid"], focal, 0.0)
    pred, target = outputs["patch_boxes"].astype(jnp.float32), outputs["target_boxes"].astype(jnp.float32)
    l1 = jnp.abs(pred - target).sum(-1)
    giou = giou_loss(pred, target)
    total = {name: jax.lax.psum((value * (assigned if name != "focal" else 1.0)).sum(), axis_name) / count
             for name, value in (("focal", focal), ("l1", l1), ("giou", giou))}
    loss = total["focal"] + l1_weight * total["l1"] + giou_weight * total["giou"]
    return loss, {"loss_focal": total["focal"], "loss_l1": total["l1"], "loss_giou": total["giou"],
                  "box_giou": 1.0 - total["giou"]}


def nt_xent_loss(outputs: dict[str, jax.Array], *, axis_name, temperature: float = 0.1,
                 views: tuple[str, str] = ("ssl_1", "ssl_2")) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SimCLR's NT-Xent over the global batch, for two L2-normalised views [B, D] of every example (SLIP's
    self-supervised loss). A row of one view is scored at 1 / temperature against every row of the other view (its
    positive: the same example) and every other row of its own view (itself left out); the cross-entropy is averaged
    over both views and the global batch. Metric `ssl_acc`: how often the positive scores highest."""
    first, second = outputs[views[0]], outputs[views[1]]
    b_local = first.shape[0]
    all_first = jax.lax.all_gather(first, axis_name, tiled=True)
    all_second = jax.lax.all_gather(second, axis_name, tiled=True)
    n_global = all_first.shape[0]
    own = jax.nn.one_hot(jax.lax.axis_index(axis_name) * b_local + jnp.arange(b_local), n_global, dtype=bool)

    def one_view(rows, same_view, other_view):
        cross = rows @ other_view.T / temperature  # the positive sits at the row's own index
        same = jnp.where(own, -jnp.inf, rows @ same_view.T / temperature)
        log_probs = jax.nn.log_softmax(jnp.concatenate([cross, same], axis=-1), axis=-1)
        ce = -jnp.sum(jnp.where(own, log_probs[:, :n_global], 0.0), axis=-1)
        hits = jnp.argmax(log_probs, axis=-1) == jnp.argmax(own, axis=-1)
        return ce.sum(), hits.sum()

    ce_first, hits_first = one_view(first, all_first, all_second)
    ce_second, hits_second = one_view(second, all_second, all_first)
    loss = jax.lax.psum(ce_first + ce_second, axis_name) / (2 * n_global)
    return loss, {"ssl_acc": jax.lax.psum(hits_first + hits_second, axis_name) / (2 * n_global)}


def pairwise_clip_loss(outputs: dict[str, jax.Array], *, axis_name, pairs: tuple[tuple[str, str, str, bool], ...],
                       label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """AudioCLIP's loss over modality pairs: `clip_loss` of each pair (a, b, scale key, multi_positive), averaged
    over the pairs, i.e. the mean of the 2P directional cross-entropies, whatever the number of pairs P.

    The reference divides the sum of the pairs' (two-direction, summed) losses by P!: equal to this mean for P = 3,
    twice it for P = 1 or 2. The mean keeps the loss on CLIP's scale for any choice of pairs (docs/audioclip.md)."""
    total, metrics = 0.0, {}
    for a, b, scale, multi_positive in pairs:
        pair = {"image": outputs[a], "text": outputs[b], "logit_scale": outputs[scale]}
        if multi_positive:
            pair["caption_key"] = outputs["caption_key"]
        loss, pair_metrics = clip_loss(pair, axis_name=axis_name, label_smoothing=label_smoothing,
                                       multi_positive=multi_positive)
        total = total + loss
        metrics[f"loss_{a}_{b}"] = loss
        metrics[f"{a}2{b}_acc"] = pair_metrics["i2t_acc"]
    return total / len(pairs), metrics


def shard_loss(loss_fn: LossFn, mesh: Mesh) -> Callable[[dict[str, jax.Array], dict[str, jax.Array]],
                                                         tuple[jax.Array, dict]]:
    """`loss(per_example, shared)` on global arrays, from a local-shard `loss_fn(outputs, *, axis_name)`: the
    per-example arrays split over the batch axes, the shared ones (temperatures, class embeddings) replicated."""

    def checked(per_example: dict[str, jax.Array], shared: dict[str, jax.Array]):
        if clash := sorted(set(per_example) & set(shared)):  # {**p, **s} would drop the per-example ones
            raise ValueError(f"the method's outputs {clash} are both per-example and shared: name them apart")
        loss, metrics = loss_fn({**per_example, **shared}, axis_name=BATCH_AXES)
        if jnp.ndim(loss) or any(jnp.ndim(v) for v in metrics.values()):  # (jax's own error: "Gradient only defined
            shapes = {k: jnp.shape(v) for k, v in {"loss": loss, **metrics}.items() if jnp.ndim(v)}  # for scalar...")
            raise ValueError(f"the method's loss must return a scalar loss and scalar metrics, got the shapes {shapes}"
                             ": reduce over the batch (a mean of the local rows, then pmean over axis_name)")
        return loss, metrics

    def run(per_example: dict[str, jax.Array], shared: dict[str, jax.Array]):
        specs = ({k: PartitionSpec(BATCH_AXES) for k in per_example}, {k: PartitionSpec() for k in shared})
        fn = jax.shard_map(checked, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(), check_vma=True)
        try:
            return fn(per_example, shared)
        except ValueError as e:  # shard_map's words for a value left different on each device: say what to do
            if "out_specs" not in str(e) or "replicat" not in str(e):
                raise
            raise ValueError("the method's loss returned a value that differs between devices (the loss or a metric "
                             "computed from the local rows alone): psum or pmean it over axis_name "
                             f"(docs/methods.md). JAX said: {str(e)[:300]}") from None

    return run
