r"""MaPLe's reference recipe for ViT-B/16 (vit_b16_c2_ep5_batch4_2ctx), base-to-new on a TFDS set:

  clip-jax convert ViT-B-16.safetensors --to-workdir runs/b16            # OpenAI weights (QuickGELU)
  clip-jax train --config configs/maple/b16.py --workdir runs/maple-flowers \
      --config.few_shot.tfds_data_dir=/data/tfds
  clip-jax train --config configs/maple/b16.py:dtd --workdir runs/maple-dtd

The reference: 16 shots of the base half, batch 4, 5 epochs, SGD lr 0.0035 with momentum 0.9, weight decay 5e-4,
cosine after one warm-up epoch at 1e-5, fp16; M = 2 prompts per layer started from "a photo" ("of a" kept as fixed
words), J = 9 prompted blocks of 12 in each tower, coupling maps 512 -> 768; random resized crops and flips. Here: the
same shots, batch, epochs, prompts and depth, bf16 compute, AdamW (the trainer's optimizer) at the learning rate
chosen on shapes (not tuned at B/16), a linear warm-up epoch, no augmentation. Every step runs the image tower
(its prompts change the image embeddings) and the C_base class prompts through the text tower.
The argument picks the set (configs/common.py::FEW_SHOT_TFDS); `:<set>,all` trains on every class for the same
epochs (`--config.few_shot.classes=all` alone would keep the base half's steps, counted before the overrides).
"""

from clip_jax.config import default_config
from configs.common import few_shot_arg, few_shot_b16


def get_config(arg: str = "oxford_flowers102"):
    dataset, _, classes = few_shot_arg(arg)
    config = few_shot_b16(
        default_config(), "maple", dataset, epochs=5, batch=4, classes=classes, n_ctx=2, ctx_init="a photo of a",
        prompt_depth=9,
    )
    config.optimizer.lr = 3.5e-3
    config.optimizer.weight_decay = 5e-4
    return config
