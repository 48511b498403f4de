"""ViLD (Gu et al., ICLR 2022): an open-vocabulary detector distilled from a CLIP.

The detector (models/detection.py::ViLDCLIP) is the CLIP's image tower with a box and an objectness per patch (the
proposals, trained class-agnostically on base boxes: focal loss, L1 + GIoU) and a region head of RoIAlign features.
Region embeddings are trained by
- ViLD-text (`text_weight`): softmax cross-entropy of the regions against the fixed text embeddings of the classes
  plus a learned background embedding, at temperature 1 / 0.01. The classifier holds every class, and the novel
  ones' logits are multiplied by 0 (the reference's `lvis_rare_masks`, 1 = base): they stay in the softmax's
  denominator as a constant logit 0, as in the reference;
- ViLD-image (`image_weight`): the L1 distance (summed over dimensions, averaged over regions) between the region
  embedding and the teacher CLIP's embedding of the same box cropped at 1x and 1.5x, computed once before training
  (`prepare`) and stored with the examples;
- ViLD (both) with one head, or ViLD-ensemble (`ensemble`) with a head per loss, combined at inference by the
  weighted geometric mean of models/detection.py::ViLDCLIP.detect.

The regions of an image (`regions` of them) are drawn around its ground-truth objects and at random
(data/detection.py::sample_regions) rather than taken from a trained RPN's proposals: METHODS.md 11.5's
simplification, the same for every variant; at test the detector's own per-patch proposals are classified.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import losses
from clip_jax.data.classification import class_embeddings
from clip_jax.data.detection import DetectionSet, region_crop_embeddings, sample_regions
from clip_jax.data.shapes import ZERO_SHOT_TEMPLATES
from clip_jax.errors import ConfigError
from clip_jax.methods.base import Field, Preparation, StepFns
from clip_jax.methods.detection import DetectionConfig, DetectionMethod
from clip_jax.models.detection import ViLDCLIP

# The text tower only names the classes (once, before training); the image tower is the detector's backbone.
FROZEN = (r"^text/", r"^logit_scale$")


@dataclasses.dataclass(frozen=True)
class ViLDConfig(DetectionConfig):
    text_weight: float = 1.0  # ViLD-text's cross-entropy (0: ViLD-image alone)
    image_weight: float = 0.5  # ViLD-image's L1 distillation, the paper's w for R50 (0: ViLD-text alone)
    ensemble: bool = False  # ViLD-ensemble: a second region head for the distillation
    regions: int = 16  # regions per training image
    foreground: float = 0.5  # of them, the fraction drawn around objects
    region_width: int = 256
    region_pool: int = 2  # RoIAlign bins per side
    temperature: float = 100.0  # ViLD's 1 / 0.01
    crop_scales: tuple = (1.0, 1.5)  # the teacher's crops of each region
    templates: tuple = ZERO_SHOT_TEMPLATES  # the class prompts; their embeddings averaged


class ViLDMethod(DetectionMethod):
    name = "vild"
    Config = ViLDConfig
    export_leaves = ("the vild detector's heads have", "clip-jax detect")

    def __init__(self, config):
        super().__init__(config)
        h = self.hparams
        if h.text_weight < 0 or h.image_weight < 0 or h.text_weight + h.image_weight == 0:
            raise ConfigError(f"method vild needs text_weight and image_weight >= 0, not both 0 (got {h.text_weight}, "
                              f"{h.image_weight})")
        if h.ensemble and (h.text_weight == 0 or h.image_weight == 0):
            raise ConfigError("method.ensemble trains a head per loss: set both text_weight and image_weight > 0")
        self.classes: np.ndarray | None = None

    model_fields = (*DetectionMethod.model_fields, "text_weight", "image_weight", "ensemble", "region_width",
                    "region_pool", "temperature", "templates")

    def extra_fields(self) -> dict[str, Field]:
        r, d = self.hparams.regions, self.config.model.embed_dim
        return {"regions": Field((r, 4), np.float32), "region_classes": Field((r,), np.int32),
                "teacher": Field((r, d), np.float32)}

    def extra_arrays(self, prep: Preparation, data: DetectionSet) -> dict[str, np.ndarray]:
        h = self.hparams
        drawn = [sample_regions(b, c, np.random.default_rng([self.config.seed, i]), h.regions, h.foreground)
                 for i, (b, c) in enumerate(zip(data.boxes, data.classes, strict=True))]
        regions = np.stack([d[0] for d in drawn])
        # Computed for every variant (ViLD-text reads none): the variants of an experiment share one cache.
        size = self.config.model.vision.image_size
        teacher = region_crop_embeddings(prep.encode_images, data.images, regions, size, h.crop_scales)
        return {"regions": regions, "region_classes": np.stack([d[1] for d in drawn]), "teacher": teacher}

    def prepare(self, prep: Preparation) -> None:
        length = self.config.model.text.context_length
        self.classes = class_embeddings(lambda texts: prep.encode_texts(prep.tokenizer(texts, length)), self.names(),
                                        self.hparams.templates)
        super().prepare(prep)

    def model(self) -> ViLDCLIP:
        h = self.hparams
        return ViLDCLIP(self.model_config(), box_width=h.box_width, region_width=h.region_width,
                        region_pool=h.region_pool, ensemble=h.ensemble, region_temperature=h.temperature)

    def detection_queries(self, texts, tokenizer, names):
        return class_embeddings(texts, names, self.hparams.templates), self.base_mask(names)

    def step_fns(self, model: ViLDCLIP) -> StepFns:
        if self.classes is None:
            raise RuntimeError("ViLDMethod.prepare must run before step_fns (the class embeddings)")
        h = self.hparams
        classes = jnp.asarray(self.classes)
        base = jnp.asarray(self.base_mask(self.names()))

        def forward(m: ViLDCLIP, images, regions):
            grid = m.grid_features(images)
            boxes, objectness = m.proposals(grid)
            text, image = m.region_embeddings(grid, regions)
            return boxes, objectness, m.region_logits(text, classes), image

        def embed(params, batch, rng):
            del rng
            boxes, objectness, logits, image = model.apply({"params": params}, batch["image"], batch["regions"],
                                                           method=forward)
            # Novel classes' logits x 0 (the reference's mask): a constant in the denominator, never a target.
            logits = jnp.concatenate([logits[..., :1], logits[..., 1:] * base], axis=-1)
            return {"patch_logits": objectness[..., None], "patch_boxes": boxes, "region_logits": logits,
                    "image_regions": image}

        def targets(batch):
            assigned = batch["patch_classes"] >= 0
            return {"patch_targets": assigned[..., None], "patch_valid": jnp.ones_like(assigned)[..., None],
                    "assigned": assigned, "target_boxes": batch["patch_boxes"],
                    "region_classes": batch["region_classes"], "teacher": batch["teacher"]}

        def loss(outputs, *, axis_name):
            total, metrics = losses.detection_loss(outputs, axis_name=axis_name, l1_weight=h.l1_weight,
                                                   giou_weight=h.giou_weight)
            # Region labels: 0 the background, 1 + c for class c of the data.
            labels = outputs["region_classes"] + 1
            logits = outputs["region_logits"].astype(jnp.float32)
            ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[..., None], axis=-1)[..., 0]
            count = jax.lax.psum(labels.size, axis_name)
            text_loss = jax.lax.psum(ce.sum(), axis_name) / count
            l1 = jnp.abs(outputs["image_regions"] - outputs["teacher"]).sum(-1)
            image_loss = jax.lax.psum(l1.sum(), axis_name) / count
            hits = jax.lax.psum((jnp.argmax(logits, axis=-1) == labels).sum(), axis_name) / count
            total = total + h.text_weight * text_loss + h.image_weight * image_loss
            return total, {**metrics, "loss_text": text_loss, "loss_image": image_loss, "region_acc": hits}

        return StepFns(embed=embed, shared=lambda params: {}, loss=loss, targets=targets)

    def check(self, mesh) -> None:
        super().check(mesh)
        if not any(p == r"^text/" for p in self.config.optimizer.frozen):
            raise ConfigError("method vild keeps the text tower frozen (the class embeddings are computed once): set "
                              f"--config.optimizer.frozen=\"{FROZEN}\" (methods/vild.py::FROZEN)")
