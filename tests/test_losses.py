"""The core's proof: every sharded loss equals the single-device global-batch computation, value and gradients,
on meshes 8x1x1, 4x2x1 and 2x2x2 of fake CPU devices."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax import losses
from clip_jax.sharding import batch_sharding, make_mesh, replicated

GLOBAL_BATCH, DIM = 16, 8
LOSS_FNS = {"clip": losses.clip_loss, "siglip": losses.siglip_loss, "siglip_ring": losses.siglip_ring_loss}


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
    loss_fn = losses.shard_loss(functools.partial(LOSS_FNS[spec.pop("name")], **spec), mesh)
    image, text, scale, bias, keys = make_inputs()

    def sharded(image, text, scale, bias):
        per_example = {"image": image, "text": text, "caption_key": keys_g}
        return loss_fn(per_example, {"logit_scale": scale, "logit_bias": bias})[0]

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


def reference_hard_negatives(image, text, negative, scale, keys, negative_keys, multi_positive, label_smoothing):
    """NegCLIP's loss row by row: image i's candidates are every text and every negative whose key is not its
    caption's; the text-to-image half is CLIP's."""
    n = image.shape[0]
    same = (keys[:, None] == keys[None, :]) if multi_positive else np.eye(n, dtype=bool)
    total = 0.0
    for i in range(n):
        kept = np.array([j for j in range(n) if negative_keys[j] != keys[i]], int)
        image_to_text = scale * jnp.concatenate([text @ image[i], negative[kept] @ image[i]])
        target = np.concatenate([same[i] / same[i].sum(), np.zeros(len(kept))])
        total -= ((target * (1 - label_smoothing) + label_smoothing / len(target))
                  * jax.nn.log_softmax(image_to_text)).sum()
        text_to_image = scale * image @ text[i]
        total -= ((same[i] / same[i].sum() * (1 - label_smoothing) + label_smoothing / n)
                  * jax.nn.log_softmax(text_to_image)).sum()
    return total / (2 * n)


@pytest.mark.parametrize("mesh_sizes", [(8, 1, 1), (2, 2, 2)], ids=["8x1x1", "2x2x2"])
@pytest.mark.parametrize("multi_positive,label_smoothing", [(False, 0.0), (True, 0.1)])
def test_sharded_hard_negatives_equal_a_row_by_row_reference(mesh_sizes, multi_positive, label_smoothing):
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_sizes, strict=True)))
    image, text, scale, _, keys = make_inputs()
    rng = np.random.default_rng(1)
    negative = rng.normal(size=text.shape).astype(np.float32)
    negative /= np.linalg.norm(negative, axis=1, keepdims=True)
    negative_keys = rng.integers(0, 12, size=GLOBAL_BATCH).astype(np.uint32)  # some equal to captions' keys 0..5
    negative_keys[0] = keys[0]  # at least one negative identical to its own image's caption
    assert (negative_keys[:, None] == keys[None, :]).any(1).sum() >= 3
    loss_fn = losses.shard_loss(functools.partial(
        losses.clip_loss, multi_positive=multi_positive, label_smoothing=label_smoothing,
        negative_key="negative_text"), mesh)
    rows = batch_sharding(mesh)
    fixed = {"caption_key": jax.device_put(keys, rows), "negative_caption_key": jax.device_put(negative_keys, rows)}

    def sharded(image, text, negative, scale):
        per_example = {"image": image, "text": text, "negative_text": negative, **fixed}
        return loss_fn(per_example, {"logit_scale": scale})

    args = (*(jax.device_put(a, rows) for a in (image, text, negative)), jax.device_put(scale, replicated(mesh)))
    (got, metrics), got_grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2, 3), has_aux=True))(*args)
    want, want_grads = jax.value_and_grad(
        lambda i, t, n, s: reference_hard_negatives(i, t, n, s, keys, negative_keys, multi_positive, label_smoothing),
        argnums=(0, 1, 2, 3))(image, text, negative, scale)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for g, w, name in zip(got_grads, want_grads, ("image", "text", "negative", "scale"), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6, err_msg=name)
    # The negatives change the loss (else the test above would pass without them)
    assert abs(float(want) - float(reference_clip(image, text, scale, keys if multi_positive else None,
                                                   label_smoothing))) > 1e-3
    differs = negative_keys != keys
    beats = (image * text).sum(1) > (image * negative).sum(1)
    assert float(metrics["hard_negative_acc"]) == pytest.approx((beats & differs).sum() / differs.sum())


def test_caption_key_identifies_equal_rows():
    tokens = jnp.array([[1, 5, 9, 0], [1, 5, 9, 0], [1, 9, 5, 0], [1, 5, 9, 2]], jnp.int32)
    k = np.asarray(losses.caption_key(tokens))
    assert k[0] == k[1] and len({k[0], k[2], k[3]}) == 3


# --- Long-CLIP: primary component matching ------------------------------------------------------------------------
LC_BATCH, LC_DIM, LC_K = 32, 6, 3


def reference_pca(x, k):
    """The reference's PCA, written out: SVD of the batch centred by its mean, top-k right singular vectors,
    X_c V V^T + mean."""
    mean = x.mean(0, keepdims=True)
    _, _, vt = jnp.linalg.svd(x - mean, full_matrices=False)
    v = vt[:k].T
    return (x - mean) @ v @ v.T + mean


def reference_longclip(image, long, short, scale, shards, keys=None, short_keys=None, short_weight=1.0):
    """CLIP(image, long) + w * CLIP(coarse image, short), coarse = PCA of each device's block of rows."""
    coarse = jnp.concatenate([reference_pca(block, LC_K) for block in jnp.split(image, shards)])
    return reference_clip(image, long, scale, keys, 0.1) + short_weight * reference_clip(coarse, short, scale,
                                                                                         short_keys, 0.1)


def longclip_inputs(seed=0):
    rng = np.random.default_rng(seed)
    # Anisotropic features with distinct singular values: the SVD-based reference is then differentiable too.
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    image = unit(rng.normal(size=(LC_BATCH, LC_DIM)) * np.linspace(3.0, 0.5, LC_DIM)).astype(np.float32)
    long = unit(rng.normal(size=(LC_BATCH, LC_DIM))).astype(np.float32)
    short = unit(rng.normal(size=(LC_BATCH, LC_DIM))).astype(np.float32)
    keys = rng.integers(0, 5, size=LC_BATCH).astype(np.uint32)  # short captions repeat
    return image, long, short, np.float32(5.0), keys


@pytest.mark.parametrize("devices,mesh_sizes,scope,multi,short_weight", [
    (2, (2, 1, 1), "local", False, 1.0),
    (4, (2, 2, 1), "local", True, 0.5),
    (8, (2, 2, 2), "global", True, 1.0),
], ids=["local-2dev", "local-4dev-multi", "global-8dev-multi"])
def test_longclip_loss_equals_reference(devices, mesh_sizes, scope, multi, short_weight):
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_sizes, strict=True)), jax.devices()[:devices])
    shards = (mesh_sizes[0] * mesh_sizes[1]) if scope == "local" else 1
    loss_fn = losses.shard_loss(functools.partial(
        losses.longclip_loss, pca_components=LC_K, pca_scope=scope, multi_positive=multi, short_weight=short_weight),
        mesh)
    image, long, short, scale, keys = longclip_inputs()
    long_keys = np.arange(LC_BATCH, dtype=np.uint32)  # distinct long captions
    put = lambda x: jax.device_put(x, batch_sharding(mesh))

    def sharded(image, long, short, scale):
        per_example = {"image": image, "text": long, "short_text": short, "caption_key": put(long_keys),
                       "short_caption_key": put(keys)}
        return loss_fn(per_example, {"logit_scale": scale})[0]

    args = (put(image), put(long), put(short), jax.device_put(scale, replicated(mesh)))
    got, got_grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2, 3)))(*args)
    ref_keys = (jnp.asarray(long_keys), jnp.asarray(keys)) if multi else (None, None)
    want, want_grads = jax.value_and_grad(
        lambda i, t, s, c: reference_longclip(i, t, s, c, shards, *ref_keys, short_weight=short_weight),
        argnums=(0, 1, 2, 3))(image, long, short, scale)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w, name in zip(got_grads, want_grads, ("image", "long", "short", "scale"), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5, err_msg=name)


def test_pca_on_a_batch_of_at_most_k_plus_1_rows_is_exact():
    # The centred batch has rank <= B - 1 <= k: the top-k components span it (REFERENCE: "a no-op at <= 33").
    x = np.random.default_rng(1).normal(size=(LC_K + 1, LC_DIM)).astype(np.float32)
    np.testing.assert_allclose(losses.pca_reconstruct(jnp.asarray(x), LC_K), x, atol=1e-5)
    # and with more rows it is a real reduction: the residual is orthogonal to the kept components
    y = np.random.default_rng(2).normal(size=(12, LC_DIM)).astype(np.float32)
    r = np.asarray(losses.pca_reconstruct(jnp.asarray(y), LC_K))
    assert np.linalg.matrix_rank(r - y.mean(0), tol=1e-4) == LC_K
    np.testing.assert_allclose((y - r).T @ (r - y.mean(0)), 0, atol=1e-4)


def _spectrum_case(rows, dim, singular_values, rng):
    u, _ = np.linalg.qr(rng.normal(size=(rows, rows)))
    v, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    s = np.asarray(singular_values)
    return (u[:, : len(s)] * s) @ v[:, : len(s)].T + 0.3  # an offset: centring must remove it


@pytest.mark.parametrize("case", ["repeated-gram", "repeated-covariance", "duplicate-rows"])
def test_pca_gradient_is_finite_and_right_in_degenerate_batches(case):
    """Repeated singular values inside the kept and the discarded sets, or a batch with duplicated rows (many zero
    singular values): where gradients through an SVD or the eigenvectors divide by zero (jnp.linalg.svd gives NaN
    on 128 rows with 64 duplicates), the gradient is finite and equals float64 central differences of a numpy PCA."""
    rng = np.random.default_rng(3)
    if case == "duplicate-rows":
        base = rng.normal(size=(6, 16))
        x = np.concatenate([base, base])
    else:
        rows, dim = (8, 16) if case == "repeated-gram" else (32, 8)
        x = _spectrum_case(rows, dim, [4.0, 4.0, 2.0, 1.0, 1.0, 1.0, 0.5, 0.5], rng)
    w = rng.normal(size=x.shape)
    k = 3  # a gap after the 3rd singular value: the kept subspace is well defined

    def numpy_pca(x):
        c = x - x.mean(0)
        _, vecs = np.linalg.eigh(c.T @ c)
        top = vecs[:, -k:]
        return c @ top @ top.T + x.mean(0)

    f = lambda x: np.sum(w * np.tanh(numpy_pca(x)))
    eps = 1e-6
    numeric = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        step = np.zeros_like(x)
        step[idx] = eps
        numeric[idx] = (f(x + step) - f(x - step)) / (2 * eps)
    grad = jax.grad(lambda x: jnp.sum(w * jnp.tanh(losses.pca_reconstruct(x, k))))(jnp.asarray(x, jnp.float32))
    assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_allclose(np.asarray(grad), numeric, atol=2e-3)


# --- NT-Xent (SLIP's self-supervised loss) ----------------------------------------------------------------------
def reference_nt_xent(first, second, temperature):
    """SimCLR's textbook form: the 2N views stacked, a 2N x 2N similarity matrix without its diagonal, the positive
    of view i its other view i +- N."""
    n = first.shape[0]
    z = jnp.concatenate([first, second])
    logits = z @ z.T / temperature - 1e9 * jnp.eye(2 * n)
    positive = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), positive[:, None], axis=1).mean()


@pytest.mark.parametrize("mesh_sizes", [(8, 1, 1), (2, 2, 2)], ids=["8x1x1", "2x2x2"])
def test_sharded_nt_xent_equals_the_dense_reference(mesh_sizes):
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_sizes, strict=True)))
    first, noise, *_ = make_inputs(seed=3)
    second = first + 0.8 * noise  # views that resemble each other: some, not all, positives score highest
    second /= np.linalg.norm(second, axis=1, keepdims=True)
    loss_fn = losses.shard_loss(functools.partial(losses.nt_xent_loss, temperature=0.1), mesh)

    def sharded(a, b):
        return loss_fn({"ssl_1": a, "ssl_2": b}, {})

    args = [jax.device_put(x, batch_sharding(mesh)) for x in (first, second)]
    (got, metrics), got_grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1), has_aux=True))(*args)
    want, want_grads = jax.value_and_grad(reference_nt_xent, argnums=(0, 1))(first, second, 0.1)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)
    # ssl_acc by hand: the positive (the other view of the same example) has the highest similarity
    z = np.concatenate([first, second])
    sims = z @ z.T - 1e9 * np.eye(2 * GLOBAL_BATCH)
    want_acc = np.mean(np.argmax(sims, 1) == np.r_[np.arange(GLOBAL_BATCH, 2 * GLOBAL_BATCH), np.arange(GLOBAL_BATCH)])
    assert 0 < want_acc < 1
    np.testing.assert_allclose(metrics["ssl_acc"], want_acc)


def _directional_ce(logits: np.ndarray) -> np.ndarray:
    """Per-row cross-entropy of the diagonal, in numpy: log-sum-exp minus the positive's logit."""
    top = logits.max(1, keepdims=True)
    return (np.log(np.exp(logits - top).sum(1)) + top[:, 0]) - np.diag(logits)


@pytest.mark.parametrize("pairs", [3, 2, 1], ids=["three_pairs", "two_pairs", "one_pair"])
def test_sharded_pairwise_loss_equals_a_hand_written_sum(pairs):
    """AudioCLIP's loss over P modality pairs: the 2P directional cross-entropies of the batch, summed by hand in
    numpy and divided by 2P (the mean); the reference's normalisation, the sum of the pairs' two-direction sums over
    P!, is this mean x 2P / P! (equal for P = 3)."""
    mesh = make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    rng = np.random.default_rng(7)
    emb = {m: rng.normal(size=(GLOBAL_BATCH, DIM)).astype(np.float32) for m in ("audio", "image", "text")}
    emb = {m: v / np.linalg.norm(v, axis=1, keepdims=True) for m, v in emb.items()}
    scales = {"s_at": np.float32(9.0), "s_ai": np.float32(4.0), "s_it": np.float32(14.0)}
    table = (("audio", "text", "s_at", False), ("audio", "image", "s_ai", False), ("image", "text", "s_it", False))
    chosen = table[:pairs]
    loss_fn = losses.shard_loss(functools.partial(losses.pairwise_clip_loss, pairs=chosen), mesh)
    placed = {m: jax.device_put(v, batch_sharding(mesh)) for m, v in emb.items()}
    got, metrics = jax.jit(loss_fn)(placed, {k: jnp.asarray(v) for k, v in scales.items()})
    total = 0.0
    for a, b, scale, _ in chosen:
        logits = scales[scale] * emb[a].astype(np.float64) @ emb[b].T.astype(np.float64)
        total += _directional_ce(logits).sum() + _directional_ce(logits.T).sum()
    want = total / (2 * pairs * GLOBAL_BATCH)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    reference = total / GLOBAL_BATCH / math.factorial(pairs)  # each pair's two mean CEs, summed, over P!
    np.testing.assert_allclose(float(got) * 2 * pairs / math.factorial(pairs), reference, rtol=1e-5)
    assert set(metrics) == {f"loss_{a}_{b}" for a, b, *_ in chosen} | {f"{a}2{b}_acc" for a, b, *_ in chosen}


# --- dense and multi-label losses (LSeg, GroupViT) -------------------------------------------------------------------
def test_sharded_pixel_cross_entropy_equals_a_numpy_loop_over_labelled_pixels():
    """LSeg's loss: the mean over the batch's labelled pixels (255 ignored) of -log softmax at the true label, from
    loops in numpy, and its gradient by hand."""
    mesh = make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(8, 5, 4, 6)).astype(np.float32)
    seg = rng.integers(0, 6, size=(8, 5, 4)).astype(np.uint8)
    seg[rng.random(seg.shape) < 0.3] = 255
    seg[0] = 255  # an example with no labelled pixel counts for nothing
    total, count, hits = 0.0, 0, 0
    for b, y, x in np.ndindex(seg.shape):
        if seg[b, y, x] != 255:
            row = logits[b, y, x].astype(np.float64)
            total += np.log(np.exp(row).sum()) - row[seg[b, y, x]]
            count += 1
            hits += int(np.argmax(row) == seg[b, y, x])
    loss_fn = losses.shard_loss(losses.pixel_cross_entropy, mesh)
    placed = {"pixel_logits": jax.device_put(logits, batch_sharding(mesh)),
              "seg": jax.device_put(seg, batch_sharding(mesh))}
    got, metrics = jax.jit(loss_fn)(placed, {})
    np.testing.assert_allclose(got, total / count, rtol=1e-5)
    np.testing.assert_allclose(metrics["pixel_acc"], hits / count, rtol=1e-6)
    grad = jax.jit(jax.grad(lambda x: loss_fn({"pixel_logits": x, "seg": placed["seg"]}, {})[0]))(
        placed["pixel_logits"])
    # d(mean CE)/d(logits) by hand: (softmax - one-hot) / count on labelled pixels, 0 on ignored ones.
    expected = jax.nn.softmax(logits, axis=-1) - jax.nn.one_hot(np.where(seg == 255, 0, seg), 6)
    expected = np.where((seg != 255)[..., None], expected, 0.0) / count
    np.testing.assert_allclose(np.asarray(grad), expected, atol=1e-6)


@pytest.mark.parametrize("multi_positive", [False, True], ids=["own_prompts", "identical_prompts"])
def test_sharded_multi_label_loss_equals_a_numpy_loop(multi_positive):
    """GroupViT's multi-label loss, written as loops in numpy: each image against all N*K prompts with target mass
    split evenly over its positives (its own K, or every prompt identical to one of them), each prompt against the N
    images (its own, or every image holding an identical prompt); the mean of the two directions' means."""
    n, k, d = 16, 3, 8
    mesh = make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    rng = np.random.default_rng(11)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    image = unit(rng.normal(size=(n, d))).astype(np.float32)
    prompts = unit(rng.normal(size=(n, k, d))).astype(np.float32)
    keys = rng.integers(0, 10, size=(n, k)).astype(np.uint32)  # phrases repeat across the batch
    scale = np.float32(6.0)

    def log_softmax(row):
        row = row.astype(np.float64)
        return row - np.log(np.exp(row - row.max()).sum()) - row.max()

    flat_prompts, flat_keys = prompts.reshape(n * k, d), keys.reshape(n * k)
    i2p = 0.0
    for i in range(n):
        positive = np.isin(flat_keys, keys[i]) if multi_positive else np.arange(n * k) // k == i
        i2p += -(positive / positive.sum() * log_softmax(scale * flat_prompts @ image[i])).sum()
    p2i = 0.0
    for p in range(n * k):
        positive = (keys == flat_keys[p]).any(axis=1) if multi_positive else np.arange(n) == p // k
        p2i += -(positive / positive.sum() * log_softmax(scale * image @ flat_prompts[p])).sum()
    want = (i2p / n + p2i / (n * k)) / 2

    loss_fn = losses.shard_loss(functools.partial(losses.multi_label_loss, multi_positive=multi_positive), mesh)
    placed = {"image": image, "prompts": prompts, "prompt_key": keys}
    placed = {name: jax.device_put(v, batch_sharding(mesh)) for name, v in placed.items()}
    got, _ = jax.jit(loss_fn)(placed, {"multi_label_scale": jnp.asarray(scale)})
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_a_methods_loss_that_breaks_the_contract_is_told_what_to_do():
    """A new method's loss with a metric of the local rows alone, a loss per example, or an output both per-example
    and shared got JAX's own words ("out_specs which require replication", "Gradient only defined for scalar-output
    functions"), and the CLI called it an internal error."""
    mesh = make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    x = jnp.ones((8, 3))

    def local_metric(outputs, *, axis_name):
        local = outputs["x"].sum()
        return jax.lax.psum(local, axis_name), {"loss_local": local}  # the metric not psum'd

    def per_example(outputs, *, axis_name):
        return outputs["x"].sum(-1), {}

    for fn, said in ((local_metric, "returned a value that differs between devices"),
                     (per_example, "must return a scalar loss and scalar metrics, got the shapes {'loss': (1,)}")):
        with pytest.raises(ValueError, match=re.escape(said)):
            jax.jit(losses.shard_loss(fn, mesh))({"x": x}, {})
    with pytest.raises(ValueError, match=r"outputs \['x'\] are both per-example and shared"):
        jax.jit(losses.shard_loss(per_example, mesh))({"x": x}, {"x": jnp.ones(3)})
