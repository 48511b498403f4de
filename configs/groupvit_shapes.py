"""GroupViT on `shapes`: grouping learnt from image-text pairs alone, on cluttered scenes, from the demo CLIP.

  clip-jax train --config configs/demo.py --workdir workdirs/demo                         # the CLIP it starts from
  clip-jax train --config configs/groupvit_shapes.py --workdir workdirs/groupvit_shapes
  clip-jax train --config configs/groupvit_shapes.py:no_multi_label --workdir workdirs/groupvit_no_ml
  clip-jax train --config configs/groupvit_shapes.py:long --workdir workdirs/groupvit_long     # 4x the steps

The image tower is a GroupViT of the tiny model's width: stage 1 is the demo ViT's first two blocks with 16 group
tokens, stage 2 one block with 8, stage 3 one block over the 8 segments (methods/groupvit.py); the text tower and
temperature start from the demo's. Captions are the scenes' long ones half the time (they name every object), and
each image has 3 per-object phrases for the multi-label loss. No pixel label is ever used in training; the `seg`
evaluation chooses the background threshold on `val` (evaluate/segmentation.py).
"""

from clip_jax.config import default_config, method_config
from clip_jax.evaluate.suite import eval_defaults
from configs.common import dense_shapes

VARIANTS = {"full": {}, "no_multi_label": {"multi_label_weight": 0.0}, "long": {}}


def get_config(variant: str = "full"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    config = dense_shapes(default_config(), background="threshold")  # GroupViT has no background segment
    config.method = method_config("groupvit", multi_positive=True, **VARIANTS[variant])
    config.data.long_caption_prob = 0.5
    config.total_steps = 2400 if variant == "long" else 600
    config.batch_size = 64
    config.optimizer.lr = 5e-4
    config.optimizer.warmup_steps = 60
    config.optimizer.weight_decay = 0.05
    config.checkpoint.every_steps = 300
    config.evals.shapes = eval_defaults("shapes")  # the image-level zero-shot it keeps
    return config
