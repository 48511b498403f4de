"""Image-text retrieval recall@k in both directions, with several captions per image and duplicate captions.

A retrieved caption is correct for an image if it belongs to that image, or if its text equals the text of one
of the image's captions (a generic caption such as "a red circle." written for several images is a right answer
for each of them). Symmetrically, an image is correct for a caption if it has a caption with the same text.

Exact score ties (between items that are not known to be the same caption) are broken uniformly at random, in
expectation: a query scores the probability that a random order of its tied items puts a correct one in the top
k. A collapsed model whose embeddings are all equal therefore scores chance, not 100%.

Scores are computed one chunk of queries at a time, so the full N_images x N_texts matrix never exists.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def expected_hits(greater: np.ndarray, tied_wrong: np.ndarray, tied_right: np.ndarray, k: int) -> np.ndarray:
    """Per query, the probability that a correct item is among the top k under a random order of ties.

    greater: wrong items scoring strictly above the best correct item; tied_wrong / tied_right: wrong / correct
    items scoring exactly as the best correct one (tied_right >= 1). The tied block starts at rank `greater`, so
    m = k - greater of its slots are in the top k; all m are wrong with probability
    C(tied_wrong, m) / C(tied_wrong + tied_right, m) = prod_{i<m} (tied_wrong - i) / (tied_wrong + tied_right - i).
    """
    slots = k - np.asarray(greater, np.int64)
    wrong = np.asarray(tied_wrong, np.float64)
    total = wrong + np.asarray(tied_right, np.float64)
    miss = np.ones(slots.shape, np.float64)
    for i in range(k):
        # A factor is 0 once i reaches tied_wrong (too few wrong items to fill the slots): a certain hit.
        factor = np.where(i < wrong, (wrong - i) / np.maximum(total - i, 1.0), 0.0)
        miss *= np.where(i < slots, factor, 1.0)
    return 1.0 - miss


def _relation(image_of_text: np.ndarray, text_ids: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """The (text id, image) pairs "an image has a caption with this text", deduplicated and sorted by text id."""
    keys = np.unique(text_ids.astype(np.int64) * n_images + image_of_text)
    return keys // n_images, keys % n_images


def _expand(sorted_keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, value) for every pair whose key equals queries[row]: the sparse rows of a relation, vectorised."""
    starts = np.searchsorted(sorted_keys, queries, side="left")
    counts = np.searchsorted(sorted_keys, queries, side="right") - starts
    rows = np.repeat(np.arange(len(queries)), counts)
    # positions starts[r], starts[r]+1, ... of every row r, concatenated
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, values[np.repeat(starts, counts) + offsets]


def _chunk_hits(scores: np.ndarray, correct: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """[len(ks)] sums over the chunk's queries of the expected hits at each k."""
    if not correct.any(axis=1).all():
        raise ValueError("a query has no correct item (an image without captions?)")
    best = np.where(correct, scores, -np.inf).max(axis=1, keepdims=True)
    greater = ((scores > best) & ~correct).sum(axis=1)
    tied = scores == best
    tied_wrong = (tied & ~correct).sum(axis=1)
    tied_right = (tied & correct).sum(axis=1)
    return np.array([expected_hits(greater, tied_wrong, tied_right, k).sum() for k in ks])


def retrieval_recall(
    image_embeds: np.ndarray,
    text_embeds: np.ndarray,
    image_of_text: np.ndarray | None = None,
    ks: Sequence[int] = (1, 5, 10),
    texts: Sequence[str] | None = None,
    chunk_size: int = 512,
) -> dict[str, float]:
    """Recall@k for image-to-text and text-to-image retrieval, as fractions of queries (keys i2t_r{k}, t2i_r{k}).

    image_embeds [N_i, D], text_embeds [N_t, D]: normalised embeddings (scores are dot products).
    image_of_text [N_t]: the image index of each caption; default caption j belongs to image j. Every image
    needs at least one caption. texts: the caption strings; when given, equal strings count as the same caption.
    """
    image_embeds = np.asarray(image_embeds, np.float32)
    text_embeds = np.asarray(text_embeds, np.float32)
    n_images, n_texts = len(image_embeds), len(text_embeds)
    if image_of_text is None:
        if n_images != n_texts:
            raise ValueError(f"{n_images} images and {n_texts} texts: pass image_of_text to pair them")
        image_of_text = np.arange(n_texts)
    image_of_text = np.asarray(image_of_text, np.int64)
    if image_of_text.shape != (n_texts,):
        raise ValueError(f"image_of_text has shape {image_of_text.shape}, expected ({n_texts},)")
    if n_texts and (image_of_text.min() < 0 or image_of_text.max() >= n_images):
        raise ValueError(f"image_of_text has indices outside [0, {n_images})")
    if texts is not None and len(texts) != n_texts:
        raise ValueError(f"{len(texts)} texts for {n_texts} text embeddings")
    if not (np.isfinite(image_embeds).all() and np.isfinite(text_embeds).all()):
        raise ValueError("embeddings contain NaN or inf")
    if min(ks) < 1:
        raise ValueError(f"ks must be >= 1, got {ks}")
    # One id per distinct caption: the caption's index, or the index of its string among the distinct strings.
    if texts is None:
        text_ids = np.arange(n_texts)
    else:
        text_ids = np.unique(np.asarray(texts, dtype=object), return_inverse=True)[1].reshape(-1)
    n_ids = int(text_ids.max()) + 1 if n_texts else 0
    rel_text, rel_image = _relation(image_of_text, text_ids, n_images)
    # the same relation sorted by image, for the image-to-text direction
    by_image = np.argsort(rel_image, kind="stable")
    rel_image_sorted, rel_text_by_image = rel_image[by_image], rel_text[by_image]

    i2t = np.zeros(len(ks))
    for start in range(0, n_images, chunk_size):
        queries = np.arange(start, min(start + chunk_size, n_images))
        # ids of the captions each image has, as a [chunk, n_ids] table, then looked up for every caption
        has_id = np.zeros((len(queries), n_ids), bool)
        has_id[_expand(rel_image_sorted, rel_text_by_image, queries)] = True
        i2t += _chunk_hits(image_embeds[queries] @ text_embeds.T, has_id[:, text_ids], ks)

    t2i = np.zeros(len(ks))
    for start in range(0, n_texts, chunk_size):
        queries = slice(start, min(start + chunk_size, n_texts))
        correct = np.zeros((len(text_ids[queries]), n_images), bool)
        correct[_expand(rel_text, rel_image, text_ids[queries])] = True
        t2i += _chunk_hits(text_embeds[queries] @ image_embeds.T, correct, ks)

    result = {}
    for name, hits, n in (("i2t", i2t, n_images), ("t2i", t2i, n_texts)):
        for k, h in zip(ks, hits, strict=True):
            result[f"{name}_r{k}"] = float(h / n) if n else float("nan")
    return result
