"""Open-vocabulary detectors on a CLIP: ViLD's two-stage detector and GLIP's grounding one-stage detector.

Both read the image tower's last-block patch tokens as a grid (`token_grid`, any tower) and put one box on every
patch (OWL-ViT's design, `BoxHead`): with a 6 x 6 grid the patches are the anchors and, for ViLD, the proposals. The
alternative, a region proposal network with anchors of several sizes and sampling inside the step, is a different
kind of model (dynamic shapes, METHODS.md 11.7); per-patch boxes are static, cheap and enough for objects of one to
four patches.

- `ViLDCLIP`: a class-agnostic objectness per patch (the proposal score), and a region head (`RegionHead`:
  RoIAlign of the grid in each box, an MLP, a projection into the joint space, L2-normalised) whose embeddings are
  classified against the classes' text embeddings plus a learned background embedding at temperature 1 / 0.01
  (ViLD-text), and distilled toward the CLIP's embeddings of the same boxes cropped (ViLD-image). `ensemble`: a
  second region head for the distillation (ViLD-ensemble's two branches).
- `GLIPCLIP`: patch features projected into the joint space, the prompt's word features (the text tower's token
  states through its final LayerNorm and projection), `fusion_layers` of bidirectional cross-attention between the
  two (GLIP's deep fusion, added with a layer scale), and alignment logits patch x word.

Detection (`detect`) returns boxes [B, N, 4] (normalised xyxy) and class scores [B, N, C] for the N candidates of
each image; evaluate/detection.py keeps the best after per-class non-maximum suppression.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.boxes import cxcywh_to_xyxy, decode_boxes, patch_anchors, roi_align
from clip_jax.models.clip import CLIP, l2_normalize
from clip_jax.models.grouping import CrossAttention
from clip_jax.models.layers import LayerNorm, dense, layer_norm, partitioned

# The focal loss's prior (RetinaNet, GLIP's b_0): logits start at P(positive) = 0.01, so the many negatives do not
# swamp the first steps.
PRIOR_LOGIT = -math.log((1 - 0.01) / 0.01)


class BoxHead(nn.Module):
    """A box per patch: an MLP of the patch feature [B, P, W] to 4 logits added to the logits of the patch's own box
    (`decode_boxes`), so a zero output is the patch itself; normalised xyxy [B, P, 4]. The last layer starts at
    zero."""

    width: int
    grid: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.gelu(dense(self.width, ("embed", "mlp"), "fc_1", self.dtype)(x))
        h = nn.gelu(dense(self.width, ("mlp", "mlp"), "fc_2", self.dtype)(h))
        zeros = nn.initializers.zeros
        logits = nn.Dense(4, dtype=self.dtype, name="out", kernel_init=partitioned(zeros, ("mlp", None)),
                          bias_init=partitioned(zeros, (None,)))(h)
        return cxcywh_to_xyxy(decode_boxes(logits.astype(jnp.float32), patch_anchors(self.grid)))


class RegionHead(nn.Module):
    """Region embeddings [B, R, D], L2-normalised, of boxes [B, R, 4] on a feature grid [B, g, g, W]: RoIAlign to
    pool x pool bins, flattened, an MLP of `width`, and a projection into the joint space (ViLD's
    "project-to-clip")."""

    width: int
    embed_dim: int
    pool: int = 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, grid: jax.Array, boxes: jax.Array) -> jax.Array:
        regions = roi_align(grid, boxes, self.pool)  # [B, R, pool, pool, W]
        x = regions.reshape(*regions.shape[:2], -1)
        x = nn.gelu(dense(self.width, ("embed", "mlp"), "fc_1", self.dtype)(x))
        x = nn.gelu(dense(self.width, ("mlp", "mlp"), "fc_2", self.dtype)(x))
        return l2_normalize(dense(self.embed_dim, ("mlp", "proj"), "proj", self.dtype)(x).astype(jnp.float32))


class Scalars(nn.Module):
    """Parameters of a detector's head that are not a layer (an embedding, a temperature), in a submodule of their own
    so that they are created when first used: the plain CLIP's functions (text embeddings before training, from a
    checkpoint without them) run without them."""

    shapes: tuple[tuple[str, tuple[int, ...], Any, tuple[str | None, ...]], ...]  # name, shape, init, axis names

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        return {name: self.param(name, partitioned(init, names), shape, jnp.float32)
                for name, shape, init, names in self.shapes}


class DetectorCLIP(CLIP):
    """What both detectors share: the grid of patch features and the per-patch boxes (`box_head`)."""

    box_width: int = 128

    def grid_features(self, images: jax.Array) -> jax.Array:
        """The image tower's patch tokens as a grid, LayerNormed: [B, g, g, W]."""
        return self.det_norm(self.visual.token_grid(self.normalize(images)))

    def setup(self):
        super().setup()
        dtype = jnp.dtype(self.config.dtype)
        self.det_norm = LayerNorm(dtype)
        self.box_head = BoxHead(self.box_width, self.config.vision.grid, dtype)


class ViLDCLIP(DetectorCLIP):
    """Parameters: CLIP's (`visual`, `text`, `logit_scale`) and `det_norm`, `box_head`, `objectness`, `text_head`
    (the region head), `image_head` (with `ensemble`), `background/embedding` (the learned background embedding)."""

    region_width: int = 256
    region_pool: int = 2
    ensemble: bool = False
    region_temperature: float = 100.0  # ViLD's 1 / 0.01, fixed

    def setup(self):
        super().setup()
        dtype = jnp.dtype(self.config.dtype)
        d = self.config.embed_dim
        self.objectness = nn.Dense(1, dtype=dtype, kernel_init=partitioned(nn.initializers.zeros, ("embed", None)),
                                   bias_init=partitioned(nn.initializers.constant(PRIOR_LOGIT), (None,)))
        self.text_head = RegionHead(self.region_width, d, self.region_pool, dtype)
        if self.ensemble:
            self.image_head = RegionHead(self.region_width, d, self.region_pool, dtype)
        # ViLD's background embedding: N(0, 0.01) at init, normalised where used.
        self.background = Scalars((("embedding", (d,), nn.initializers.normal(0.01), ("proj",)),))

    def proposals(self, grid: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(boxes [B, P, 4] normalised xyxy, objectness logits [B, P]) of a feature grid: one proposal per patch."""
        tokens = grid.reshape(grid.shape[0], -1, grid.shape[-1])
        return self.box_head(tokens), self.objectness(tokens)[..., 0].astype(jnp.float32)

    def propose(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(boxes [B, P, 4], objectness probabilities [B, P]) of images: the proposals every variant classifies (and
        the CLIP-on-crops baseline, evaluate/detection.py::clip_on_crops)."""
        boxes, objectness = self.proposals(self.grid_features(images))
        return boxes, jax.nn.sigmoid(objectness)

    def region_embeddings(self, grid: jax.Array, boxes: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(the text branch's, the image branch's) region embeddings [B, R, D]; one and the same without
        `ensemble`."""
        text = self.text_head(grid, boxes)
        return text, (self.image_head(grid, boxes) if self.ensemble else text)

    def region_logits(self, embeddings: jax.Array, classes: jax.Array) -> jax.Array:
        """[..., 1 + C]: the background and the classes (L2-normalised embeddings [C, D]) at the fixed
        temperature."""
        table = jnp.concatenate([l2_normalize(self.background()["embedding"])[None], classes.astype(jnp.float32)])
        return self.region_temperature * embeddings @ table.T

    def detect(self, images: jax.Array, queries: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """(boxes [B, P, 4], scores [B, P, C]) for queries (class embeddings [C, D], base [C]: 1 for a class trained
        on). A proposal's score for a class is its objectness times the class's probability (softmax with the
        background). With `ensemble`, the two branches' probabilities are combined as ViLD-ensemble's geometric mean:
        text^(2/3) image^(1/3) on base classes, text^(1/3) image^(2/3) on the others."""
        classes, base = queries
        grid = self.grid_features(images)
        boxes, objectness = self.proposals(grid)
        text, image = self.region_embeddings(grid, boxes)
        probs = jax.nn.softmax(self.region_logits(text, classes), axis=-1)[..., 1:]
        if self.ensemble:
            image_probs = jax.nn.softmax(self.region_logits(image, classes), axis=-1)[..., 1:]
            weight = jnp.where(base.astype(bool), 2 / 3, 1 / 3)
            probs = probs**weight * image_probs ** (1 - weight)
        return boxes, probs * jax.nn.sigmoid(objectness)[..., None]

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
        grid = self.grid_features(images)
        boxes, objectness = self.proposals(grid)
        text, image = self.region_embeddings(grid, boxes)
        classes = jnp.zeros((1, self.config.embed_dim), jnp.float32)
        return {**super().__call__(images, tokens), "boxes": boxes, "objectness": objectness,
                "region_logits": self.region_logits(text, classes), "image_regions": image}  # init: all params


class Fusion(nn.Module):
    """GLIP's deep fusion, one layer: image features attend to the words (padding masked out), words attend to the
    image features, each added with a layer scale (per channel, starting at `scale_init`) after a LayerNorm of both
    inputs."""

    num_heads: int
    scale_init: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, visual: jax.Array, words: jax.Array, word_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        width = visual.shape[-1]
        head_dim = width // self.num_heads
        v, w = LayerNorm(self.dtype, name="ln_visual")(visual), LayerNorm(self.dtype, name="ln_words")(words)
        init = partitioned(nn.initializers.constant(self.scale_init), ("norm",))
        gamma_v = self.param("scale_visual", init, (width,), jnp.float32)
        gamma_w = self.param("scale_words", init, (width,), jnp.float32)
        to_words = CrossAttention(self.num_heads, head_dim, 1, self.dtype, name="visual_to_words")(v, w, word_mask)
        to_visual = CrossAttention(self.num_heads, head_dim, 1, self.dtype, name="words_to_visual")(w, v)
        return visual + gamma_v * to_words, words + gamma_w * to_visual


class GLIPCLIP(DetectorCLIP):
    """Parameters: CLIP's and `det_norm`, `box_head`, `visual_proj` (patch features into the joint space), `fusion_i`,
    `alignment` (`log_scale`, the log of the alignment temperature; `bias`, GLIP's b_0, the focal prior)."""

    fusion_layers: int = 1
    fusion_heads: int = 4

    def setup(self):
        super().setup()
        dtype = jnp.dtype(self.config.dtype)
        self.visual_proj = dense(self.config.embed_dim, ("embed", "proj"), "visual_proj", dtype)
        self.fusion = [Fusion(self.fusion_heads, dtype=dtype, name=f"fusion_{i}") for i in range(self.fusion_layers)]
        self.alignment = Scalars((("log_scale", (), nn.initializers.constant(math.log(10.0)), ()),
                                  ("bias", (), nn.initializers.constant(PRIOR_LOGIT), ())))

    def word_features(self, tokens: jax.Array) -> jax.Array:
        """[B, T, D]: every position's token state through the text tower's final LayerNorm and projection (the
        pooled embedding's path), unnormalised. The tower is causal: position t has read tokens 0..t only."""
        states = self.text(tokens).tokens
        params = nn.meta.unbox(self.text.variables["params"])  # boxed with their axis names while initialising
        x = layer_norm(states, params["ln_final"]).astype(states.dtype)
        return x @ params["text_projection"].astype(states.dtype)

    def visual_features(self, images: jax.Array) -> jax.Array:
        """The patch features in the joint space [B, P, D], before fusion."""
        grid = self.grid_features(images)
        return self.visual_proj(grid.reshape(grid.shape[0], -1, grid.shape[-1]))

    def align(self, visual: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(alignment logits [B, P, T] of every patch (`visual_features` [B, P, D]) with every token of the prompts
        `tokens` [B, T], boxes [B, P, 4]) after the fusion layers. Logit = exp(log_scale) * cosine + bias
        (`alignment`)."""
        words = self.word_features(tokens)
        mask = tokens != 0
        for layer in self.fusion:
            visual, words = layer(visual, words, mask)
        boxes = self.box_head(visual)
        cosine = l2_normalize(visual.astype(jnp.float32)) @ l2_normalize(words.astype(jnp.float32)).swapaxes(1, 2)
        alignment = self.alignment()
        return jnp.exp(alignment["log_scale"]) * cosine + alignment["bias"], boxes

    def detect(self, images: jax.Array, queries: tuple[jax.Array, jax.Array, jax.Array]
               ) -> tuple[jax.Array, jax.Array]:
        """(boxes [B, Q * P, 4], scores [B, Q * P, C]) for Q prompts: tokens [Q, T], each phrase's last-token
        position [Q, K], and which class each phrase names as one-hot rows [Q, K, C] (zero rows for padding; see
        data/detection.py::prompt_chunks). Every patch's box under every prompt, scored sigmoid(logit at the
        phrase's last token) for the prompt's classes and 0 for the others: with fusion a patch's box depends on the
        prompt, as in GLIP, which runs one prompt per chunk of classes."""
        tokens, ends, onehot = queries
        visual = self.visual_features(images)
        b = images.shape[0]
        all_boxes, all_scores = [], []
        for q in range(tokens.shape[0]):  # a few prompts: unrolled
            logits, boxes = self.align(visual, jnp.broadcast_to(tokens[q], (b, tokens.shape[1])))
            at_ends = jnp.take(logits, ends[q], axis=2)  # [B, P, K]
            all_scores.append(jax.nn.sigmoid(at_ends) @ onehot[q].astype(jnp.float32))
            all_boxes.append(boxes)
        return jnp.concatenate(all_boxes, axis=1), jnp.concatenate(all_scores, axis=1)

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
        logits, boxes = self.align(self.visual_features(images), tokens)
        return {**super().__call__(images, tokens), "align_logits": logits, "boxes": boxes}  # init: all params
