"""GLIP on `shapes`: detection as grounding on the demo CLIP, trained with prompts naming seen colour-shape pairs and
their boxes in cluttered scenes, then prompted with the held-out pairs' names (docs/detection.md).

  clip-jax train --config configs/demo.py --workdir workdirs/demo                          # the CLIP it starts from
  clip-jax train --config configs/glip_shapes.py --workdir workdirs/glip                   # one deep-fusion layer
  clip-jax train --config configs/glip_shapes.py:no_fusion --workdir workdirs/glip_nofuse  # GLIP-T (A): no fusion

A training prompt names the scene's classes and random other seen pairs, 6 phrases in all (methods/glip.py). The
text tower and CLIP's temperature are frozen; the image tower, the fusion and the heads train. Steps and learning
rate are those of configs/vild_shapes.py, set a priori.
"""

from clip_jax.config import default_config
from clip_jax.methods.glip import FROZEN
from configs.common import detection_shapes

VARIANTS = {"fusion": {}, "no_fusion": {"fusion_layers": 0}}


def get_config(variant: str = "fusion"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return detection_shapes(default_config(), "glip", FROZEN, **VARIANTS[variant])
