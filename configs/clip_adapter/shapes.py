"""CLIP-Adapter on shapes (docs/few_shot.md), from the demo CLIP:

  clip-jax train --config configs/clip_adapter/shapes.py --workdir workdirs/clip_adapter

The visual adapter (embed_dim -> /4 -> embed_dim) with the reference's residual ratio 0.2, 200 epochs of batch 32.
"""

from clip_jax.config import default_config
from configs.common import few_shot_shapes


def get_config():
    config = few_shot_shapes(default_config(), "clip_adapter", alpha=0.2)
    config.batch_size = 32
    config.total_steps = 2000
    config.optimizer.lr = 1e-3
    config.optimizer.weight_decay = 1e-2
    return config
