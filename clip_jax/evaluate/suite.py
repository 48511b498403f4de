"""The evaluation suite a run reports: zero-shot classification and image-text retrieval on the configured
source. For `shapes`: zero-shot top-1 on held-out colour-shape pairs (never in training captions) and on seen
pairs, both among all pairs, and retrieval R@1/5/10 on test images with their long (distinct) captions."""

from __future__ import annotations

import functools

import ml_collections
import numpy as np

from clip_jax.data.pipeline import get_source
from clip_jax.data.shapes import ZERO_SHOT_TEMPLATES
from clip_jax.data.tokenizer import ClipTokenizer
from clip_jax.evaluate.encoder import Encoder
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
    if config.data.source != "shapes":
        raise ValueError(f"no built-in evaluation for data.source {config.data.source!r}")
    encoder = Encoder(model, params, mesh, config.eval.batch_size)
    context = config.model.text.context_length
    encode_texts = lambda texts: encoder.texts(tokenizer(list(texts), context))
    key = config.to_json()
    n = config.eval.num_examples
    source = get_source(config, "test")
    classes = class_embeddings(encode_texts, source.class_names(), ZERO_SHOT_TEMPLATES)
    results: dict[str, float] = {}
    for split, suffix in (("test_held_out", ""), ("test_seen", "_seen")):
        images, labels, _ = _shapes_eval_data(key, split, n, None)
        acc = zero_shot_accuracy(encoder.images(images), labels, classes)
        results[f"zero_shot_top1{suffix}"] = float(acc["top1"])
        results[f"zero_shot_top5{suffix}"] = float(acc["top5"])
    images, _, captions = _shapes_eval_data(key, "test", n, "long_caption")
    recall = retrieval_recall(encoder.images(images), encode_texts(captions), texts=captions)
    results.update({k: float(v) for k, v in recall.items()})
    return results


def print_results(results: dict[str, float]) -> None:
    width = max(len(k) for k in results)
    print("\n" + "results".center(width + 12, "-"))
    for k, v in results.items():
        print(f"{k:<{width}}  {v:>10.4f}" if isinstance(v, float) else f"{k:<{width}}  {v!s:>10}")
    print("-" * (width + 12), flush=True)
