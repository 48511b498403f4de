"""Zero-shot classification: top-k accuracy of images against class embeddings (`classification.class_embeddings`,
the prompt ensemble of each class name).

The functions take embeddings or encoding callables, not a model: the caller composes tokenizer and encoder,
e.g. `encode_texts = lambda texts: encoder.texts(tokenizer(texts, context_length))`.

Exact score ties are broken uniformly at random, in expectation (as in `retrieval`): a model whose embeddings
have collapsed scores chance, not 100%.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from clip_jax.data.classification import class_embeddings


def zero_shot_accuracy(
    image_embeds: np.ndarray,
    labels: np.ndarray,
    class_embeds: np.ndarray,
    candidate_classes: Sequence[int] | None = None,
    top_k: Sequence[int] = (1, 5),
    chunk_size: int = 4096,
) -> dict[str, float]:
    """Top-k accuracy {"top1": ..., "top5": ..., "n": N} of images [N, D] with class indices `labels` [N]
    against `class_embeds` [C, D].

    Predictions are among all C classes, or among `candidate_classes` only (e.g. the held-out classes, to
    measure generalisation to unseen classes without the seen ones as distractors); every label must then be a
    candidate. A k at or above the number of candidates scores 1.
    """
    image_embeds = np.asarray(image_embeds, np.float32)
    class_embeds = np.asarray(class_embeds, np.float32)
    labels = np.asarray(labels, np.int64).reshape(-1)
    n, n_classes = len(image_embeds), len(class_embeds)
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} image embeddings")
    if min(top_k) < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not (np.isfinite(image_embeds).all() and np.isfinite(class_embeds).all()):
        raise ValueError("embeddings contain NaN or inf")
    candidates = np.arange(n_classes) if candidate_classes is None else np.asarray(candidate_classes, np.int64)
    if len(np.unique(candidates)) != len(candidates) or candidates.min() < 0 or candidates.max() >= n_classes:
        raise ValueError(f"candidate_classes must be distinct class indices in [0, {n_classes})")
    # Restricting the choice = scoring against the candidates' embeddings only, with labels renumbered.
    position = np.full(n_classes, -1)
    position[candidates] = np.arange(len(candidates))
    if n and (labels.min() < 0 or labels.max() >= n_classes or (position[labels] < 0).any()):
        raise ValueError("a label is not a class index among the candidate classes")
    targets = position[labels]
    weights = class_embeds[candidates]

    hits = np.zeros(len(top_k))
    for start in range(0, n, chunk_size):
        scores = image_embeds[start : start + chunk_size] @ weights.T
        rows = np.arange(len(scores))
        true = scores[rows, targets[start : start + chunk_size]][:, None]
        greater = (scores > true).sum(axis=1)
        tied = (scores == true).sum(axis=1) - 1  # other classes tied with the true one
        for i, k in enumerate(top_k):
            # The true class lands uniformly among its tied block of tied + 1 slots starting at rank `greater`:
            # it is in the top k with probability (k - greater) / (tied + 1), clipped to [0, 1].
            hits[i] += (np.clip(k - greater, 0, tied + 1) / (tied + 1)).sum()
    result: dict[str, float] = {
        f"top{k}": float(h / n) if n else float("nan")
        for k, h in zip(top_k, hits, strict=True)
    }
    result["n"] = n
    return result


def accuracy_entries(prefix: str, acc: Mapping[str, float], n_classes: int, suffix: str = "") -> dict[str, float]:
    """`{prefix}_top1{suffix}`, and `{prefix}_top5{suffix}` where there are more than 5 classes: with 5 or fewer,
    top-5 is 1.0 whatever the model, a figure that would only mislead."""
    entries = {f"{prefix}_top1{suffix}": float(acc["top1"])}
    if n_classes > 5:
        entries[f"{prefix}_top5{suffix}"] = float(acc["top5"])
    return entries


def zero_shot_by_split(splits: Mapping[str, tuple[np.ndarray, np.ndarray]], class_embeds: np.ndarray,
                       prefix: str) -> dict[str, float]:
    """`accuracy_entries` of each split, given as suffix -> (normalised embeddings, labels): e.g. the shapes
    evaluations' held-out ("") and seen ("_seen") pairs."""
    results = {}
    for suffix, (embeds, labels) in splits.items():
        acc = zero_shot_accuracy(embeds, labels, class_embeds)
        results |= accuracy_entries(prefix, acc, len(class_embeds), suffix)
    return results


def evaluate_zero_shot(
    encode_images: Callable[[np.ndarray], np.ndarray],
    encode_texts: Callable[[list[str]], np.ndarray],
    source: Any,
    class_names: Sequence[str],
    templates: Sequence[str],
    n: int | None = None,
    candidate_classes: Sequence[int] | None = None,
    top_k: Sequence[int] = (1, 5),
    load_batch: int = 1024,
) -> dict[str, float]:
    """Zero-shot accuracy on the first `n` examples (all if None, at most len(source)) of a random-access source
    whose items have "image" (uint8 [H, W, 3]) and "label" (class index). Returns {"top1", "top5", "n"}."""
    n = len(source) if n is None else min(n, len(source))
    class_embeds = class_embeddings(encode_texts, class_names, templates)
    embeds, labels = [], []
    # Images are loaded and encoded load_batch at a time so host memory stays bounded on large sets.
    for start in range(0, n, load_batch):
        items = [source[i] for i in range(start, min(start + load_batch, n))]
        embeds.append(np.asarray(encode_images(np.stack([item["image"] for item in items])), np.float32))
        labels.extend(int(item["label"]) for item in items)
    image_embeds = np.concatenate(embeds) if embeds else np.zeros((0, class_embeds.shape[1]), np.float32)
    return zero_shot_accuracy(image_embeds, np.asarray(labels, np.int64), class_embeds, candidate_classes, top_k)
