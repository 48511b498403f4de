"""LSeg (Li et al., ICLR 2022): a dense image encoder trained against a frozen CLIP text tower on pixel labels.

A small decoder (`LSegDecoder`) turns the image tower's last-block patch tokens into a per-pixel embedding at half
the image resolution; each pixel's score for a label is the cosine similarity between its embedding and the label's
text embedding times a temperature, fixed at 1/0.07 as the reference's (its `logit_scale` is a plain tensor, never
trained) or learned (`learn_temperature`). The scores are upsampled bilinearly to the image (the reference's
`Interpolate(2)`) and trained with per-pixel cross-entropy, ignoring label 255. Labels are the text embeddings of the
training label set, computed once before training from the frozen text tower (`prepare`); at test time any names
can be scored, which is the zero-shot claim: the same model names classes it never saw a mask of.

Deviations from the reference, on purpose: the decoder reads the last block only (DPT reassembles four) and
normalises with GroupNorm where DPT's fusion blocks use BatchNorm (per example: a step does not depend on how the
batch is split over devices); the image tower starts from the CLIP checkpoint (`init_visual`), as METHODS.md 10.5
suggests, where LSeg's starts from an ImageNet ViT (`init_visual=False` keeps it random instead).

Data: `shapes` scenes with their masks (data/shapes.py::scene_masks), label set the background and the seen colour-
shape pairs (the held-out pairs never appear in a training scene); or a folder in the PASCAL VOC layout
(`data.source = "segmentation_folder"`, data/segmentation.py), label set its classes but `unseen`, whose pixels are
ignored in training and which the `segmentation_folder` evaluation names zero-shot (its `novel` field).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import losses
from clip_jax.data.classification import class_embeddings
from clip_jax.data.pipeline import Captions, shapes_config, train_iterator
from clip_jax.data.segmentation import BACKGROUND, IGNORE, folder_class_names
from clip_jax.data.shapes import ZERO_SHOT_TEMPLATES, class_names, scene_masks
from clip_jax.errors import ConfigError
from clip_jax.methods.base import Field, Method, Preparation, StepFns
from clip_jax.models import flops
from clip_jax.models.clip import CLIP, CLIPConfig, l2_normalize
from clip_jax.models.layers import LayerNorm, dense
from clip_jax.models.resnet import Norm, conv2d

# The text tower stays as the checkpoint's: the training labels' embeddings are computed from it once.
FROZEN = (r"^text/", r"^logit_scale$")


@dataclasses.dataclass(frozen=True)
class LSegConfig:
    decoder_width: int = 64
    temperature: float = 1 / 0.07  # the multiplier of cosine similarities (the reference's, fixed)
    learn_temperature: bool = False  # learn it from `temperature` instead (clamped like CLIP's)
    init_visual: bool = True  # the image tower from the warm start (CLIP's); False: random, as LSeg's is not CLIP's
    templates: tuple = ZERO_SHOT_TEMPLATES  # the label prompts, "{}" the label name; embeddings averaged
    # A segmentation folder's classes left out of training (their pixels ignored), to be named zero-shot at test (the
    # ZS3 setting); on shapes the held-out pairs are left out by the data itself.
    unseen: tuple = ()


class LSegDecoder(nn.Module):
    """Patch-token grid [B, g, g, C] -> per-pixel embeddings [B, S/2, S/2, embed_dim]: LayerNorm, a 1x1 projection,
    then per doubling of the resolution bilinear x2 upsampling, a 3x3 convolution, GroupNorm and GELU, until half the
    image size; a last 1x1 projection to the joint space."""

    width: int
    embed_dim: int
    out_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, grid: jax.Array) -> jax.Array:
        x = dense(self.width, ("embed", "mlp"), "proj_in", self.dtype)(LayerNorm(self.dtype, name="ln_in")(grid))
        for i in range(upsampling_steps(grid.shape[1], self.out_size)):
            size = min(2 * x.shape[1], self.out_size)
            x = jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), "bilinear")
            x = conv2d(self.width, 3, f"conv_{i}", self.dtype)(x)
            x = nn.gelu(Norm("group", dtype=self.dtype, name=f"norm_{i}")(x))
        return dense(self.embed_dim, ("mlp", "proj"), "proj_out", self.dtype)(x)


def upsampling_steps(grid: int, out_size: int) -> int:
    """How many x2 upsamplings take a grid to `out_size` (the last one may be less than x2)."""
    return max(0, math.ceil(math.log2(out_size / grid)))


class LSegCLIP(CLIP):
    """CLIP with the dense decoder: parameters `visual`, `text`, `logit_scale` as CLIP's, `decoder/...`, and with
    `learn_temperature` `lseg_logit_scale` (the log of the pixels' temperature)."""

    decoder_width: int = 64
    pixel_temperature: float = 1 / 0.07
    learn_temperature: bool = False

    def setup(self):
        super().setup()
        cfg = self.config
        self.decoder = LSegDecoder(self.decoder_width, cfg.embed_dim, cfg.vision.image_size // 2,
                                   jnp.dtype(cfg.dtype))
        if self.learn_temperature:
            init = nn.initializers.constant(math.log(self.pixel_temperature))
            self.lseg_logit_scale = self.param("lseg_logit_scale", init, (), jnp.float32)

    def pixel_scale(self) -> jax.Array:
        if self.learn_temperature:
            return self.clamped_scale(self.lseg_logit_scale)
        return jnp.asarray(self.pixel_temperature, jnp.float32)

    def dense_logits(self, images: jax.Array, labels: jax.Array) -> jax.Array:
        """Scores [B, S/2, S/2, L] of each half-resolution pixel against L2-normalised label embeddings [L, D]."""
        pixels = l2_normalize(self.decoder(self.visual.token_grid(self.normalize(images))))
        return self.pixel_scale() * pixels @ labels.astype(jnp.float32).T

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
        labels = jnp.zeros((1, self.config.embed_dim), jnp.float32)
        return {**super().__call__(images, tokens), "pixels": self.dense_logits(images, labels)}  # init: all params


@dataclasses.dataclass(frozen=True)
class PixelLabels:
    """The pipeline's hook (`TrainExample`'s `add_fields`): `seg`, uint8 [S, S], the example's class map (a
    segmentation folder's mask, or a shapes scene's `scene_masks`) in the training label set's indices (`lookup`, 256
    entries: source label -> training label, IGNORE for a class outside the set and for IGNORE itself)."""

    image_size: int
    lookup: tuple[int, ...]

    def __call__(self, example: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        del rng
        classes = example["seg"] if "seg" in example else scene_masks(example["scene"], self.image_size)[0]
        return {"seg": np.asarray(self.lookup, np.uint8)[classes]}


class LSegMethod(Method):
    """Images and their masks; per-pixel cross-entropy against the frozen text embeddings of the label set."""

    name = "lseg"
    segment_background = "label"
    export_leaves = ("LSeg's decoder has", "clip-jax segment")
    Config = LSegConfig

    def __init__(self, config):
        super().__init__(config)
        if config.data.source not in ("shapes", "segmentation_folder"):
            raise ConfigError(f"method lseg trains on masks: data.source 'shapes' or 'segmentation_folder' (the VOC "
                              f"layout), not {config.data.source!r}")
        if config.data.augment:
            raise ConfigError("method lseg needs data.augment False: the crop would not move the masks with the image")
        if not any(re.match(p, "text/") for p in config.optimizer.frozen):
            raise ConfigError("method lseg keeps the text tower frozen (the labels' embeddings are computed once): "
                              "add '^text/' to optimizer.frozen (methods/lseg.py::FROZEN)")
        if self.hparams.temperature <= 0:
            raise ConfigError(f"method.temperature must be > 0, got {self.hparams.temperature}")
        self._labels: np.ndarray | None = None

    # --- the label set ------------------------------------------------------------------------------------------
    def source_names(self) -> list[str]:
        """The names of the source's labels, index 0 the background: shapes' class map values, or the folder's."""
        if self.config.data.source == "shapes":
            return [BACKGROUND, *class_names()]
        return folder_class_names(self.config.data.path)

    def label_names(self) -> list[str]:
        """The training label set: the background, then the classes trained on (on shapes the seen colour-shape
        pairs; in a folder its classes but `unseen`)."""
        if self.config.data.source == "shapes":
            left_out = {f"{c} {s}" for c, s in shapes_config(self.config).held_out}
        else:
            left_out = set(self.hparams.unseen)
        names = self.source_names()
        return [BACKGROUND] + [n for n in names[1:] if n not in left_out]

    def lookup(self) -> tuple[int, ...]:
        """Source label (0..255) -> training label index; IGNORE for a class left out, an unknown value and IGNORE."""
        index = {n: i for i, n in enumerate(self.label_names())}
        names = self.source_names()
        return tuple(index.get(names[v], IGNORE) if 0 < v < len(names) else (0 if v == 0 else IGNORE)
                     for v in range(256))

    def prepare(self, prep: Preparation) -> None:
        length = self.config.model.text.context_length
        self._labels = class_embeddings(lambda texts: prep.encode_texts(prep.tokenizer(texts, length)),
                                        self.label_names(), self.hparams.templates)

    # --- batch, model and step ----------------------------------------------------------------------------------
    def model_config(self) -> CLIPConfig:
        return CLIPConfig.from_dict(self.config.model.to_dict())

    def fields(self) -> dict[str, Field]:
        size = self.config.model.vision.image_size
        return {"image": Field((size, size, 3), np.uint8), "seg": Field((size, size), np.uint8)}

    def captions(self) -> Captions:
        return Captions({})

    def model(self) -> LSegCLIP:
        h = self.hparams
        return LSegCLIP(self.model_config(), h.decoder_width, h.temperature, h.learn_temperature)

    def init_inputs(self) -> tuple[np.ndarray, ...]:
        cfg = self.config.model
        size = cfg.vision.image_size
        return np.zeros((1, size, size, 3), np.uint8), np.zeros((1, cfg.text.context_length), np.int32)

    def train_data(self, config, tokenizer, rows) -> Iterator[dict]:
        hook = PixelLabels(config.model.vision.image_size, self.lookup())
        return train_iterator(config, tokenizer, rows, self.captions(), hook)

    def step_fns(self, model: LSegCLIP) -> StepFns:
        if self._labels is None:
            raise RuntimeError("LSegMethod.prepare must run before step_fns (the label embeddings)")
        labels = jnp.asarray(self._labels)

        def embed(params, batch, rng):
            del rng
            images = batch["image"]
            logits = model.apply({"params": params}, images, labels, method=LSegCLIP.dense_logits)
            # The reference upsamples the half-resolution scores to the image and takes the loss there.
            return {"pixel_logits": jax.image.resize(logits, (*images.shape[:3], logits.shape[-1]), "bilinear")}

        def shared(params):
            return {"pixel_scale": model.apply({"params": params}, method=LSegCLIP.pixel_scale)}

        return StepFns(embed=embed, shared=shared, targets=lambda batch: {"seg": batch["seg"]},
                       loss=lambda outputs, *, axis_name: losses.pixel_cross_entropy(outputs, axis_name=axis_name),
                       log=lambda s: {"pixel_scale": s["pixel_scale"]})

    # --- around the step ----------------------------------------------------------------------------------------
    def check(self, mesh) -> None:
        if not self.config.init_from:
            raise ConfigError("method lseg needs init_from: a trained CLIP workdir (its text tower names the labels)")
        unknown = set(self.hparams.unseen) - set(self.source_names()[1:])
        if unknown:
            raise ConfigError(f"method.unseen names {sorted(unknown)}, which are not classes of the training data "
                              f"({self.config.data.path or 'shapes'})")

    def base_params(self, params):
        """A warm start reads the CLIP (towers and temperature); the decoder starts anew."""
        return {k: v for k, v in params.items() if k not in ("decoder", "lseg_logit_scale")}

    def warm_start(self, restored, initial):
        fresh = [k for k in ("decoder", "lseg_logit_scale") if k in initial]
        if not self.hparams.init_visual:
            fresh.append("visual")
        return {**restored, **{k: initial[k] for k in fresh}}

    def flops_per_example(self, trainable: Mapping[str, Any]) -> float:
        """The image tower (one forward if frozen, else three) and the decoder's convolutions (trained: three)."""
        cfg, width = self.model_config(), self.hparams.decoder_width
        grid, out = cfg.vision.grid, cfg.vision.image_size // 2
        feature_width = cfg.vision.width
        decoder = 2 * grid * grid * feature_width * width
        size = grid
        for _ in range(upsampling_steps(grid, out)):
            size = min(2 * size, out)
            decoder += 2 * size * size * 9 * width * width
        decoder += 2 * out * out * width * cfg.embed_dim
        labels = 2 * out * out * cfg.embed_dim * len(self.label_names())
        return (flops.pass_factor(trainable["visual"]) * flops.image_forward_flops(cfg)
                + 3 * (decoder + labels))
