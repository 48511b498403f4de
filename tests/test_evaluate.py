"""Evaluation: retrieval recall and zero-shot accuracy on hand-computed cases, the prompt ensemble, and the
sharded Encoder against an unsharded model.apply (padding of the last batch, no recompilation)."""

import zlib

import flax.linen as nn
import jax
import numpy as np
import pytest

from clip_jax.data.classification import class_embeddings
from clip_jax.data.shapes import ShapesConfig, ShapesDataset, class_names
from clip_jax.evaluate.encoder import Encoder
from clip_jax.evaluate.retrieval import expected_hits, retrieval_recall
from clip_jax.evaluate.zero_shot import accuracy_entries, evaluate_zero_shot, zero_shot_accuracy
from clip_jax.models.clip import CLIP, CLIPConfig
from clip_jax.sharding import make_mesh, param_shardings

# --- retrieval ------------------------------------------------------------------------------------------------


def recall_from_scores(scores, **kwargs):
    """retrieval_recall with image embeddings = identity, so scores[i, j] = text_embeds[j, i]: the tests state
    the score matrix directly."""
    scores = np.asarray(scores, np.float32)
    return retrieval_recall(np.eye(scores.shape[0], dtype=np.float32), scores.T, **kwargs)


def assert_recall(got, want):
    assert set(got) == set(want)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-12, err_msg=key)


def test_recall_one_caption_per_image():
    scores = [[0.9, 0.8, 0.1],
              [0.7, 0.2, 0.3],
              [0.1, 0.6, 0.5]]  # fmt: skip
    # i2t ranks of the correct caption: 0, 2, 1; t2i ranks of the correct image (columns): 0, 2, 0
    got = recall_from_scores(scores, ks=(1, 2, 3))
    assert_recall(got, {"i2t_r1": 1 / 3, "i2t_r2": 2 / 3, "i2t_r3": 1.0, "t2i_r1": 2 / 3, "t2i_r2": 2 / 3,
                        "t2i_r3": 1.0})  # fmt: skip


def test_recall_several_captions_per_image():
    scores = [[0.1, 0.5, 0.9, 0.3],   # image 0 owns captions 0, 1: best correct 0.5, beaten by caption 2
              [0.2, 0.8, 0.4, 0.7]]  # image 1 owns captions 2, 3: best correct 0.7, beaten by caption 1
    # t2i ranks (columns): caption 0 -> 1, caption 1 -> 1, caption 2 -> 1, caption 3 -> 0
    got = recall_from_scores(scores, image_of_text=np.array([0, 0, 1, 1]), ks=(1, 2))
    assert_recall(got, {"i2t_r1": 0.0, "i2t_r2": 1.0, "t2i_r1": 0.25, "t2i_r2": 1.0})


def test_recall_identical_captions_of_different_images():
    # Captions 0 and 1 are the same string (so the same embedding: equal columns), written for images 0 and 1.
    scores = [[0.6, 0.6, 0.9],
              [0.8, 0.8, 0.1],
              [0.3, 0.3, 0.2]]  # fmt: skip
    texts = ["a red circle.", "a red circle.", "a blue star."]
    # With the strings, caption 0 is right for image 1 and vice versa:
    #   i2t ranks 1, 0, 2; t2i: both red-circle captions retrieve image 1 first (a right answer), caption 2 rank 1
    got = recall_from_scores(scores, ks=(1, 2, 3), texts=texts)
    assert_recall(got, {"i2t_r1": 1 / 3, "i2t_r2": 2 / 3, "i2t_r3": 1.0, "t2i_r1": 2 / 3, "t2i_r2": 1.0,
                        "t2i_r3": 1.0})  # fmt: skip
    # Without them the twin caption is a wrong answer tied with the right one: a coin flip for images 0 and 1
    #   image 0: one wrong above, one wrong tied -> P@1 = 0, P@2 = 1/2; image 1: tied at the top -> P@1 = 1/2
    #   t2i: caption 0 rank 1 (image 1 scores 0.8 > 0.6), caption 1 rank 0, caption 2 rank 1
    got = recall_from_scores(scores, ks=(1, 2, 3))
    assert_recall(got, {"i2t_r1": 0.5 / 3, "i2t_r2": 1.5 / 3, "i2t_r3": 1.0, "t2i_r1": 1 / 3, "t2i_r2": 1.0,
                        "t2i_r3": 1.0})  # fmt: skip


def test_collapsed_embeddings_score_chance():
    ones = np.ones((10, 4), np.float32) / 2
    got = retrieval_recall(ones, ones, ks=(1, 5, 10))
    assert_recall(got, {"i2t_r1": 0.1, "i2t_r5": 0.5, "i2t_r10": 1.0, "t2i_r1": 0.1, "t2i_r5": 0.5,
                        "t2i_r10": 1.0})  # fmt: skip


def test_expected_hits_matches_enumeration():
    # 2 wrong above, then a block of 3 wrong and 2 right in random order: P(a right one in the top 4)
    # = 1 - P(both free slots wrong) = 1 - (3/5)(2/4) = 0.7
    np.testing.assert_allclose(expected_hits(np.array([2]), np.array([3]), np.array([2]), 4), [0.7])
    np.testing.assert_allclose(expected_hits(np.array([2]), np.array([3]), np.array([2]), 2), [0.0])
    np.testing.assert_allclose(expected_hits(np.array([0]), np.array([1]), np.array([1]), 5), [1.0])


def brute_force_recall(image_embeds, text_embeds, image_of_text, texts, k):
    """Sort every query's scores and find the first correct item (no exact score ties in random data)."""
    image_texts = [{texts[j] for j in np.flatnonzero(image_of_text == i)} for i in range(len(image_embeds))]
    scores = image_embeds @ text_embeds.T
    i2t = np.mean([any(texts[j] in image_texts[i] for j in np.argsort(-scores[i])[:k])
                   for i in range(len(image_embeds))])  # fmt: skip
    t2i = np.mean([any(texts[j] in image_texts[i] for i in np.argsort(-scores[:, j])[:k])
                   for j in range(len(text_embeds))])  # fmt: skip
    return i2t, t2i


def test_recall_chunked_matches_brute_force():
    rng = np.random.default_rng(0)
    n_images, n_texts = 37, 90
    image_of_text = np.concatenate([np.arange(n_images), rng.integers(0, n_images, n_texts - n_images)])
    texts = [f"caption {rng.integers(0, 60)}" for _ in range(n_texts)]  # many duplicate strings
    image_embeds = rng.normal(size=(n_images, 8)).astype(np.float32)
    text_embeds = rng.normal(size=(n_texts, 8)).astype(np.float32)
    ks = (1, 5, 10)
    full = retrieval_recall(image_embeds, text_embeds, image_of_text, ks, texts=texts, chunk_size=1000)
    chunked = retrieval_recall(image_embeds, text_embeds, image_of_text, ks, texts=texts, chunk_size=7)
    assert full == chunked
    for k in ks:
        i2t, t2i = brute_force_recall(image_embeds, text_embeds, image_of_text, texts, k)
        np.testing.assert_allclose([full[f"i2t_r{k}"], full[f"t2i_r{k}"]], [i2t, t2i], rtol=1e-12)


def test_recall_rejects_image_without_caption():
    with pytest.raises(ValueError, match="no correct item"):
        retrieval_recall(np.eye(3), np.eye(3)[:2], image_of_text=np.array([0, 0]))


# --- zero-shot ------------------------------------------------------------------------------------------------

CLASS_EMBEDS = np.eye(4, dtype=np.float32)  # score of class c = coordinate c of the image embedding


def test_zero_shot_accuracy_top_k():
    images = np.array([[0.9, 0.1, 0.0, 0.0],   # label 0: rank 0
                       [0.5, 0.6, 0.1, 0.0],   # label 0: rank 1
                       [0.0, 0.2, 0.3, 0.9],   # label 1: rank 2
                       [0.1, 0.2, 0.3, 0.4]])  # label 3: rank 0  # fmt: skip
    got = zero_shot_accuracy(images, np.array([0, 0, 1, 3]), CLASS_EMBEDS, top_k=(1, 2, 3))
    assert got == {"top1": 0.5, "top2": 0.75, "top3": 1.0, "n": 4}


def test_zero_shot_candidate_classes():
    images = np.array([[0.0, 0.2, 0.3, 0.9],     # label 1: rank 2 of all, rank 1 of {1, 2}
                       [0.9, 0.1, 0.05, 0.0]])  # label 1: rank 1 of all, rank 0 of {1, 2}  # fmt: skip
    labels = np.array([1, 1])
    assert zero_shot_accuracy(images, labels, CLASS_EMBEDS, top_k=(1, 2)) == {"top1": 0.0, "top2": 0.5, "n": 2}
    got = zero_shot_accuracy(images, labels, CLASS_EMBEDS, candidate_classes=[1, 2], top_k=(1, 5))
    assert got == {"top1": 0.5, "top5": 1.0, "n": 2}  # 5 > 2 candidates: always a hit
    with pytest.raises(ValueError, match="candidate"):
        zero_shot_accuracy(images, np.array([1, 0]), CLASS_EMBEDS, candidate_classes=[1, 2])


def test_top5_is_reported_only_over_5_classes():
    # With 5 classes or fewer every true class is in the top 5: a 1.0 that says nothing of the model.
    acc = {"top1": 0.25, "top5": 1.0, "n": 4}
    assert accuracy_entries("pets", acc, 5) == {"pets_top1": 0.25}
    assert accuracy_entries("pets", acc, 6, "_seen") == {"pets_top1_seen": 0.25, "pets_top5_seen": 1.0}


def test_zero_shot_collapsed_scores_chance():
    got = zero_shot_accuracy(np.ones((6, 4)), np.array([0, 1, 2, 3, 0, 1]), CLASS_EMBEDS, top_k=(1, 2))
    assert got == {"top1": 0.25, "top2": 0.5, "n": 6}


def test_class_embeddings_prompt_ensemble():
    vectors = {"a cat": [3.0, 0.0, 0.0], "the cat": [0.0, 4.0, 0.0], "a dog": [0.0, 0.0, 2.0],
               "the dog": [0.0, 0.6, 0.8]}  # fmt: skip
    calls = []

    def encode_texts(texts):
        calls.append(list(texts))
        return np.array([vectors[t] for t in texts])

    got = class_embeddings(encode_texts, ["cat", "dog"], ["a {}", "the {}"])
    # cat: mean([1,0,0], [0,1,0]) = [.5,.5,0] -> [1,1,0]/sqrt 2
    # dog: mean([0,0,1], [0,.6,.8]) = [0,.3,.9] -> [0,1,3]/sqrt 10
    want = np.array([[1, 1, 0] / np.sqrt(2), [0, 1, 3] / np.sqrt(10)])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert calls == [["a cat", "the cat", "a dog", "the dog"]]  # one batched call, class-major


def test_evaluate_zero_shot_on_a_source():
    # Image pixel (0, 0, 0) holds the label; images embed to one-hot of it, prompts to one-hot of their class.
    names = ["red circle", "blue star", "green cross"]
    source = [{"image": np.full((2, 2, 3), label, np.uint8), "label": label} for label in [0, 2, 1, 2, 0, 1, 1]]
    source[3]["image"][:] = 0  # one wrong prediction (a 2 seen as a 0)

    def encode_images(images):
        return np.eye(3, dtype=np.float32)[images[:, 0, 0, 0]]

    def encode_texts(texts):
        return np.stack([np.eye(3, dtype=np.float32)[[n in t for n in names].index(True)] for t in texts])

    got = evaluate_zero_shot(encode_images, encode_texts, source, names, ["a {}."], n=5, load_batch=2)
    assert got == {"top1": 0.8, "top5": 1.0, "n": 5}
    assert evaluate_zero_shot(encode_images, encode_texts, source, names, ["a {}."], n=100)["n"] == len(source)


# --- encoder --------------------------------------------------------------------------------------------------

IMAGE, CONTEXT, VOCAB, N = 32, 8, 64, 13


def tiny_model():
    tower = dict(width=32, layers=1, heads=2, head_dim=16, mlp_dim=64, activation="gelu")
    return CLIP(CLIPConfig.from_dict({
        "vision": dict(tower, type="vit", patch_size=16, image_size=IMAGE),
        "text": dict(tower, type="transformer", vocab_size=VOCAB, context_length=CONTEXT),
        "embed_dim": 16,
    }))  # fmt: skip


def make_inputs(n=N, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, IMAGE, IMAGE, 3)).astype(np.uint8)
    tokens = rng.integers(1, VOCAB - 1, size=(n, CONTEXT)).astype(np.int32)
    lengths = rng.integers(2, CONTEXT, size=n)
    tokens[np.arange(n), lengths] = VOCAB - 1  # end-of-text: the largest id, where the text tower pools
    tokens[np.arange(CONTEXT) > lengths[:, None]] = 0
    return images, tokens


@pytest.fixture(scope="module")
def model_and_reference():
    model = tiny_model()
    images, tokens = make_inputs()
    boxed = jax.jit(model.init)(jax.random.key(0), images[:1], tokens[:1])["params"]
    params = nn.unbox(boxed)

    # Unsharded reference: no mesh, no logical rules, all N examples in one call (jitted only for speed).
    @jax.jit
    def reference(params, images, tokens):
        variables = {"params": params}
        return (model.apply(variables, images, method=CLIP.encode_image),
                model.apply(variables, tokens, method=CLIP.encode_text))  # fmt: skip

    want_images, want_texts = (np.asarray(x) for x in reference(params, images, tokens))
    return model, boxed, params, (images, tokens), (want_images, want_texts)


@pytest.mark.parametrize("mesh_sizes, batch_size", [({"data": -1}, 5), ({"data": 4, "fsdp": 2}, 16)])
def test_encoder_matches_unsharded_apply(model_and_reference, mesh_sizes, batch_size):
    model, boxed, params, (images, tokens), (want_images, want_texts) = model_and_reference
    mesh = make_mesh(mesh_sizes)
    # parameters laid out as in training (fsdp-sharded on the second mesh): the encoder keeps that layout
    params = jax.device_put(params, param_shardings(boxed, mesh))
    encoder = Encoder(model, params, mesh, batch_size=batch_size)
    assert encoder.batch_size % 8 == 0 and encoder.batch_size >= batch_size
    if "fsdp" in mesh_sizes:
        specs = [x.sharding.spec for x in jax.tree.leaves(encoder.params)]
        assert any("fsdp" in str(spec) for spec in specs)

    got_images, got_texts = encoder.images(images), encoder.texts(tokens)
    assert got_images.shape == (N, 16) and got_images.dtype == np.float32
    np.testing.assert_allclose(got_images, want_images, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_texts, want_texts, rtol=1e-5, atol=1e-6)

    # Full and padded batches share one compilation; a later, smaller call compiles nothing new either.
    np.testing.assert_allclose(encoder.images(images[:3]), want_images[:3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(encoder.texts(tokens[:3]), want_texts[:3], rtol=1e-5, atol=1e-6)
    assert encoder.trace_counts == {"images": 1, "texts": 1, "audio": 0, "segment": 0}
    assert encoder._image_fn._cache_size() == 1 and encoder._text_fn._cache_size() == 1
    assert encoder.images(images[:0]).shape == (0, 16)


class WordTokenizer:
    """Stand-in with ClipTokenizer's call signature: [SOT] + hashed word ids + [EOT], EOT the largest id."""

    def __call__(self, texts, context_length):
        out = np.zeros((len(texts), context_length), np.int32)
        for row, text in enumerate(texts):
            ids = [1] + [2 + zlib.crc32(w.encode()) % (VOCAB - 3) for w in text.split()][: context_length - 2]
            out[row, : len(ids) + 1] = ids + [VOCAB - 1]
        return out


def test_evaluate_zero_shot_with_encoder_on_shapes(model_and_reference):
    model, _, params, _, _ = model_and_reference
    encoder = Encoder(model, params, make_mesh({"data": -1}), batch_size=8)
    tokenizer = WordTokenizer()
    source = ShapesDataset(ShapesConfig(image_size=IMAGE), "test_held_out")
    held_out = source.held_out_classes()
    got = evaluate_zero_shot(
        encoder.images, lambda texts: encoder.texts(tokenizer(texts, CONTEXT)), source, class_names(),
        ["a photo of the {}."], n=10, candidate_classes=held_out,
    )
    assert got["n"] == 10 and 0.0 <= got["top1"] <= got["top5"] <= 1.0
    # 48 prompts = 6 batches, one compilation
    assert encoder.trace_counts == {"images": 1, "texts": 1, "audio": 0, "segment": 0}
