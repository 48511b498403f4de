"""Tip-Adapter on shapes (docs/few_shot.md), from the demo CLIP. Training-free by default (the cache is built and
alpha, beta chosen on the val split before step 0; the one step changes nothing); `:f` fine-tunes the cache keys
(Tip-Adapter-F: AdamW lr 1e-3, eps 1e-4, 20 epochs of batch 256 in the reference; 20 epochs here):

  clip-jax train --config configs/tip_adapter/shapes.py --workdir workdirs/tip
  clip-jax train --config configs/tip_adapter/shapes.py:f --workdir workdirs/tip_f
"""

from clip_jax.config import default_config
from configs.common import few_shot_shapes


def get_config(variant: str = ""):
    if variant not in ("", "f"):
        raise ValueError(f"unknown variant {variant!r}: '' (training-free) or 'f' (Tip-Adapter-F)")
    config = few_shot_shapes(default_config(), "tip_adapter", fine_tune=variant == "f")
    config.batch_size = 32
    if variant == "f":
        config.total_steps = 200  # 20 epochs of 320 examples
        config.optimizer.lr = 1e-3
        config.optimizer.eps = 1e-4
        config.optimizer.weight_decay = 0.0
    else:
        config.total_steps = 1
        config.optimizer.frozen = (*config.optimizer.frozen, "^learner/")
    return config
