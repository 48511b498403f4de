"""LSeg on `shapes`: a dense decoder on the demo CLIP's image tower, trained on the masks of cluttered scenes of seen
colour-shape pairs against the frozen text embeddings of their names, then asked for the held-out pairs by name.

  clip-jax train --config configs/demo.py --workdir workdirs/demo                      # the CLIP it starts from
  clip-jax train --config configs/lseg_shapes.py --workdir workdirs/lseg_shapes
  clip-jax train --config configs/lseg_shapes.py:random --workdir workdirs/lseg_random   # image tower from scratch
  clip-jax train --config configs/lseg_shapes.py:learned --workdir workdirs/lseg_learned # learned temperature

The label set in training is the background and the 40 seen pairs (methods/lseg.py); the `seg` evaluation scores the
background and all 48 pairs on test_seen and test_novel scenes (evaluate/segmentation.py). The image tower trains
(LSeg fine-tunes its backbone); the text tower and CLIP's temperature are frozen. Steps and learning rate are set a
priori, not tuned on any split (docs/segmentation.md).
"""

from clip_jax.config import default_config, method_config
from clip_jax.methods.lseg import FROZEN
from configs.common import dense_shapes

VARIANTS = {"clip": {}, "random": {"init_visual": False}, "learned": {"learn_temperature": True}}


def get_config(variant: str = "clip"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    config = dense_shapes(default_config(), background="label")  # LSeg trains with the background as a label
    config.method = method_config("lseg", **VARIANTS[variant])
    config.optimizer.frozen = FROZEN
    config.total_steps = 400
    config.batch_size = 32
    config.optimizer.lr = 1e-3
    config.optimizer.warmup_steps = 40
    config.optimizer.weight_decay = 1e-4
    config.checkpoint.every_steps = 200
    return config
