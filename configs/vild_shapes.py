"""ViLD on `shapes`: a detector on the demo CLIP's image tower, trained on boxes of seen colour-shape pairs in
cluttered scenes, then asked for the held-out pairs by name (docs/detection.md).

  clip-jax train --config configs/demo.py --workdir workdirs/demo                     # the CLIP it starts from
  clip-jax train --config configs/vild_shapes.py:text --workdir workdirs/vild_text    # ViLD-text
  clip-jax train --config configs/vild_shapes.py:image --workdir workdirs/vild_image  # ViLD-image
  clip-jax train --config configs/vild_shapes.py --workdir workdirs/vild              # ViLD (w = 0.5)
  clip-jax train --config configs/vild_shapes.py:ensemble --workdir workdirs/vild_ens # ViLD-ensemble

Every variant has the same proposals (per-patch boxes and objectness trained on the base boxes), the same regions
per training image and, where distilled, the same teacher: the demo CLIP's embeddings of each region's 1x and 1.5x
crops, computed once before training and cached in the workdir. The text tower and CLIP's temperature are frozen;
the image tower trains (the detector's backbone). Steps and learning rate are set a priori, not tuned on any split.
"""

from clip_jax.config import default_config
from clip_jax.methods.vild import FROZEN
from configs.common import detection_shapes

VARIANTS = {
    "vild": {},
    "text": {"image_weight": 0.0},
    "image": {"text_weight": 0.0, "image_weight": 1.0},
    "ensemble": {"ensemble": True},
}


def get_config(variant: str = "vild"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return detection_shapes(default_config(), "vild", FROZEN, **VARIANTS[variant])
