"""WiSE-FT on shapes (docs/few_shot.md), from the demo CLIP:

  clip-jax train --config configs/wise_ft/shapes.py --workdir workdirs/wise_ft
  clip-jax wise-ft --workdir workdirs/wise_ft          # alpha 0, 0.1, ..., 1 -> workdirs/wise_ft/wise_ft.json

End-to-end fine-tuning of the image tower and a zero-shot-initialised head on the 16 shots of the 20 base classes
in the `shifted` domain, with the reference's optimizer (AdamW, weight decay 0.1 on every parameter, linear warm-up
then cosine, gradient norm clipped at 1.0). The learning rate and step count were chosen on the val split (top-1 of
the fine-tuned model on the base and new classes of the shifted domain; lr 3e-5, 1e-4 and 3e-4 at 300 steps, 1e-4 at
600: 3e-4 at 300 steps was the best, by a few val images). The `few_shot` evaluation also scores the `clean` domain,
the one the demo CLIP was pretrained in (`few_shot_shifted_*`: the entry's second domain, here clean), so each alpha
reports the fine-tuning domain and the other one.
"""

from clip_jax.config import default_config
from clip_jax.evaluate.suite import eval_defaults
from clip_jax.methods.wise_ft import FROZEN
from configs.common import few_shot_shapes


def get_config():
    config = few_shot_shapes(default_config(), "wise_ft")
    config.optimizer.frozen = FROZEN  # the text tower and the temperature; the image tower and the head train
    config.batch_size = 32
    config.total_steps = 300  # 30 epochs of 16 shots x 20 classes
    config.optimizer.lr = 3e-4
    config.optimizer.warmup_steps = 30
    config.optimizer.weight_decay = 0.1
    config.optimizer.grad_clip_norm = 1.0
    config.evals = {"few_shot": {**eval_defaults("few_shot"), "shapes_domain": "clean"}}
    return config
