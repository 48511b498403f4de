"""MaPLe on shapes (docs/few_shot.md), from the demo CLIP:

  clip-jax train --config configs/maple/shapes.py --workdir workdirs/maple

The reference: ViT-B/16, M = 2 prompts per layer started from "a photo" ("of a" kept as fixed words), depth J = 9 of
12 blocks, 16 shots, batch 4, 5 epochs, SGD lr 0.0035 with momentum, cosine. The demo CLIP's text tower has 2
blocks, so J = 2 here (both text blocks, the first 2 of the 4 image blocks); batch 4, 5 epochs (400 steps of 4
images through the prompted image tower), AdamW (the trainer's optimizer) at a learning rate chosen on the val split
(HM 0.861, 0.873, 0.858 at 1e-3, 3.5e-3, 1e-2).
"""

from clip_jax.config import default_config
from configs.common import few_shot_shapes


def get_config():
    config = few_shot_shapes(default_config(), "maple", n_ctx=2, ctx_init="a photo of a", prompt_depth=2)
    config.batch_size = 4
    config.total_steps = 400  # 5 epochs of 16 shots x 20 classes
    config.optimizer.lr = 3.5e-3
    config.optimizer.weight_decay = 5e-4
    config.checkpoint.every_steps = 400
    config.log.every_steps = 50
    return config
