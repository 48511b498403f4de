"""NegCLIP's loss on `shapes`: the demo (configs/demo.py) with a hard negative caption per example, on a CPU.

  clip-jax train --config configs/negclip_shapes.py --workdir workdirs/negclip_shapes         # the paper's loss
  clip-jax train --config configs/negclip_shapes.py:image --workdir workdirs/negclip_image    # image side only

Each example's negative is its caption with the salient object's colour or shape replaced by another training
pair's (`data.negative_captions`). The argument picks whether the negatives' gradient trains the text tower (""),
as in the paper, or only the image tower ("image", `method.negative_text_grad=False`). Each trains for the demo's
wall-clock at the rate measured before docs/demo.md's twenty-first round: 879 and 1,017 steps against the demo's
1,200 (a step costs about 1.37x and 1.18x the demo's). In that round, on validation pairs, both ended below the
demo's recipe (held-out validation top-1 0.557 and 0.690 against 0.949, seed 0).
"""

from clip_jax.config import method_config
from configs.demo import get_config as demo_config

# variant -> (the negatives' gradient reaches the text tower, steps, warm-up steps)
VARIANTS = {"": (True, 879, 117), "image": (False, 1017, 136)}


def get_config(variant: str = ""):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {tuple(VARIANTS)}")
    config = demo_config()
    text_grad, config.total_steps, config.optimizer.warmup_steps = VARIANTS[variant]
    config.eval.every_steps = config.checkpoint.every_steps = config.total_steps // 3
    config.data.negative_captions = True
    # The demo's method fields (multi-positive captions) carry over to NegCLIP's loss.
    config.method = method_config("negclip", multi_positive=config.method.multi_positive,
                                  negative_text_grad=text_grad)
    return config
