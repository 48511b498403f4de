"""The linear probe on shapes (docs/few_shot.md): logistic regression on the demo CLIP's frozen image embeddings,
the baseline CoOp compares with. It scores the base classes only.

  clip-jax train --config configs/linear_probe/shapes.py --workdir workdirs/linear_probe
"""

from clip_jax.config import default_config
from configs.common import few_shot_shapes


def get_config():
    config = few_shot_shapes(default_config(), "linear_probe")
    config.batch_size = 32
    config.total_steps = 1000
    config.optimizer.lr = 1e-2
    config.optimizer.weight_decay = 1e-3
    return config
