"""CoOp on shapes (docs/few_shot.md), from the demo CLIP:

  clip-jax train --config configs/coop/shapes.py --workdir workdirs/coop

The reference's few-shot recipe at 16 shots: 200 epochs of batch 32, SGD lr 0.002 with momentum, cosine; here
AdamW (the trainer's optimizer) at a learning rate tuned on the val split. M = 16 random context vectors at the end;
`--config.method.ctx_init="a photo of the"` starts them from that phrase (M = its token count).
"""

from clip_jax.config import default_config
from configs.common import few_shot_shapes


def get_config():
    config = few_shot_shapes(default_config(), "coop", n_ctx=16)
    config.batch_size = 32
    config.total_steps = 2000  # 200 epochs of 16 shots x 20 classes
    config.optimizer.lr = 2e-3
    config.optimizer.weight_decay = 5e-4
    return config
