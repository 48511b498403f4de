r"""CoCoOp's reference recipe for ViT-B/16 (vit_b16_c4_ep10_batch1_ctxv1), base-to-new on a TFDS set:

  clip-jax convert ViT-B-16.safetensors --to-workdir runs/b16            # OpenAI weights (QuickGELU)
  clip-jax train --config configs/cocoop/b16.py --workdir runs/cocoop-flowers \
      --config.few_shot.tfds_data_dir=/data/tfds
  clip-jax train --config configs/cocoop/b16.py:dtd --workdir runs/cocoop-dtd

The reference: 16 shots of the base half, batch 1, 10 epochs, SGD lr 0.002 with momentum 0.9, weight decay 5e-4,
cosine after one warm-up epoch at 1e-5, fp16; M = 4 context vectors started from "a photo of a", the meta-net
512 -> 32 -> 512; random resized crops and flips. Here: the same shots, batch, epochs, context and meta-net, bf16
compute, AdamW (the trainer's optimizer) at the learning rate chosen on shapes (not tuned at B/16), a linear
warm-up epoch, no augmentation (the image embeddings are computed once). A step runs the C_base class prompts of its
image through the text tower; `eval.batch_size` bounds the text sequences of an evaluation chunk
(eval.batch_size // C images).
The argument picks the set (configs/common.py::FEW_SHOT_TFDS); `:<set>,all` trains on every class for the same
epochs (`--config.few_shot.classes=all` alone would keep the base half's steps, counted before the overrides).
"""

from clip_jax.config import default_config
from configs.common import few_shot_arg, few_shot_b16


def get_config(arg: str = "oxford_flowers102"):
    dataset, _, classes = few_shot_arg(arg)
    config = few_shot_b16(
        default_config(), "cocoop", dataset, epochs=10, batch=1, classes=classes, ctx_init="a photo of a"
    )
    config.optimizer.lr = 5e-3
    config.optimizer.weight_decay = 5e-4
    return config
