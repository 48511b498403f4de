"""The evaluation suite a run reports: zero-shot classification and image-text retrieval on the configured
source. For `shapes`: zero-shot top-1 on held-out colour-shape pairs (never in training captions) and on seen
pairs, both among all pairs, and retrieval R@1/5/10 on test images with their long (distinct) captions; with
`eval.long_text`, also retrieval on captions over 77 tokens (`long_*`) and the hard-pairs test. For any source,
`eval.long_text_set` adds long-text retrieval on a folder (`long_set_*`; see `long_text.py`)."""

from __future__ import annotations

import functools

import ml_collections
import numpy as np

from clip_jax.data.pipeline import get_source
from clip_jax.data.shapes import ZERO_SHOT_TEMPLATES
from clip_jax.data.tokenizer import ClipTokenizer
from clip_jax.evaluate.encoder import Encoder
from clip_jax.evaluate.long_text import hard_pairs, hard_pairs_accuracy, load_long_text_set, shapes_long_captions
from clip_jax.evaluate.retrieval import retrieval_recall
from clip_jax.evaluate.zero_shot import class_embeddings, zero_shot_accuracy


@functools.lru_cache(maxsize=8)
def _shapes_eval_data(config_json: str, split: str, n: int, caption: str | None):
    """Eval examples are deterministic: render them once per process, not at every evaluation."""
    config = ml_collections.ConfigDict(__import__("json").loads(config_json))
    source = get_source(config, split)
    items = [source[i] for i in range(n)]
    images = np.stack([it["image"] for it in items])
    labels = np.asarray([it["label"] for it in items])
    captions = [it[caption] for it in items] if caption else None
    return images, labels, captions


def evaluate(config: ml_collections.ConfigDict, model, params, mesh, tokenizer: ClipTokenizer) -> dict[str, float]:
    encoder = Encoder(model, params, mesh, config.eval.batch_size)
    context = config.model.text.context_length
    encode_texts = lambda texts: encoder.texts(tokenizer(list(texts), context))
    results: dict[str, float] = {}
    if config.eval.long_text_set:
        images, captions, skipped = load_long_text_set(config.eval.long_text_set, config.model.vision.image_size,
                                                       config.data.max_image_bytes)
        recall = retrieval_recall(encoder.images(images), encode_texts(captions), texts=captions)
        results.update({f"long_set_{k}": float(v) for k, v in recall.items()})
        results["long_set_skipped"] = skipped
    if config.data.source != "shapes":
        return results  # no built-in evaluation for file sources
    key = config.to_json()
    n = config.eval.num_examples
    source = get_source(config, "test")
    classes = class_embeddings(encode_texts, source.class_names(), ZERO_SHOT_TEMPLATES)
    for split, suffix in (("test_held_out", ""), ("test_seen", "_seen")):
        images, labels, _ = _shapes_eval_data(key, split, n, None)
        acc = zero_shot_accuracy(encoder.images(images), labels, classes)
        results[f"zero_shot_top1{suffix}"] = float(acc["top1"])
        results[f"zero_shot_top5{suffix}"] = float(acc["top5"])
    images, _, captions = _shapes_eval_data(key, "test", n, "long_caption")
    recall = retrieval_recall(encoder.images(images), encode_texts(captions), texts=captions)
    results.update({k: float(v) for k, v in recall.items()})
    if config.eval.long_text:
        size, seed = config.model.vision.image_size, config.seed
        images, captions = shapes_long_captions(size, seed, n, tokenizer)
        recall = retrieval_recall(encoder.images(images), encode_texts(captions), texts=captions)
        results.update({f"long_{k}": float(v) for k, v in recall.items()})
        images, captions = hard_pairs(size, seed, n // 2, tokenizer)
        pairs = hard_pairs_accuracy(encoder.images(images), encode_texts(captions))
        results["hard_pairs_acc"], results["hard_pairs_image_acc"] = pairs["pairs"], pairs["images"]
    return results


def print_results(results: dict[str, float]) -> None:
    if not results:
        return
    width = max(len(k) for k in results)
    print("\n" + "results".center(width + 12, "-"))
    for k, v in results.items():
        print(f"{k:<{width}}  {v:>10.4f}" if isinstance(v, float) else f"{k:<{width}}  {v!s:>10}")
    print("-" * (width + 12), flush=True)
