r"""CLIP-Adapter's recipe for ViT-B/16, base-to-new on a TFDS set:

  clip-jax convert ViT-B-16.safetensors --to-workdir runs/b16            # OpenAI weights (QuickGELU)
  clip-jax train --config configs/clip_adapter/b16.py --workdir runs/clip_adapter-flowers \
      --config.few_shot.tfds_data_dir=/data/tfds

The reference released no configs; the paper: CoOp's 16-shot protocol, batch 32, 200 epochs, the visual adapter
(512 -> 128 -> 512 at B/16), residual ratio 0.2 for generic sets (larger for specialised ones: set method.alpha),
SGD as CoOp. Here: the same shots, batch, epochs, adapter and ratio, bf16 compute, AdamW (the trainer's optimizer)
with the learning rate and weight decay of the shapes recipe, a linear warm-up epoch, no augmentation. The argument
picks the set (`:dtd`); `:<set>,all` trains on every class for the same epochs (`--config.few_shot.classes=all`
alone would keep the base half's steps, counted before the overrides).
"""

from clip_jax.config import default_config
from configs.common import few_shot_arg, few_shot_b16


def get_config(arg: str = "oxford_flowers102"):
    dataset, _, classes = few_shot_arg(arg)
    config = few_shot_b16(default_config(), "clip_adapter", dataset, epochs=200, batch=32, classes=classes, alpha=0.2)
    config.optimizer.lr = 1e-3
    config.optimizer.weight_decay = 1e-2
    return config
