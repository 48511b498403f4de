"""CoCoOp on shapes (docs/few_shot.md), from the demo CLIP:

  clip-jax train --config configs/cocoop/shapes.py --workdir workdirs/cocoop

The reference (vit_b16_c4_ep10_batch1_ctxv1): 16 shots, batch 1, 10 epochs, SGD lr 0.002 with momentum, cosine,
M = 4 started from "a photo of a", the meta-net's bottleneck D / 16. Here the same context and batch, 10 epochs
(3,200 steps of one image: its 20 class prompts through the text tower), AdamW (the trainer's optimizer) at a learning
rate chosen on the val split (HM 0.808, 0.813, 0.818, 0.773 at 1e-3, 2e-3, 5e-3, 1e-2).
"""

from clip_jax.config import default_config
from configs.common import few_shot_shapes


def get_config():
    config = few_shot_shapes(default_config(), "cocoop", ctx_init="a photo of a")
    config.batch_size = 1
    config.total_steps = 3200  # 10 epochs of 16 shots x 20 classes
    config.optimizer.lr = 5e-3
    config.optimizer.weight_decay = 5e-4
    config.checkpoint.every_steps = 1600
    config.log.every_steps = 200
    return config
