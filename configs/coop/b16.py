"""CoOp's reference recipe for ViT-B/16, base-to-new on a TFDS set:

  clip-jax convert ViT-B-16.safetensors --to-workdir runs/b16            # OpenAI weights (QuickGELU)
  clip-jax train --config configs/coop/b16.py --workdir runs/coop-flowers --config.few_shot.tfds_data_dir=/data/tfds
  clip-jax train --config configs/coop/b16.py:oxford_flowers102,ctxv1 --workdir runs/coop-ctxv1-flowers
  clip-jax train --config configs/coop/b16.py:dtd,all --workdir runs/coop-dtd-all   # every class, 200 epochs

The reference's few-shot recipe at 16 shots (vit_b16, M = 16 random context vectors, class at the end): batch 32,
200 epochs, SGD lr 0.002 with momentum 0.9, weight decay 5e-4, cosine after one warm-up epoch at 1e-5; random
resized crops and flips. `ctxv1` is the CoOp baseline of CoCoOp's base-to-new tables (M = 4 from "a photo of a";
KaiyangZhou/CoOp#27: the two give very different numbers). Here: the same shots, batch, epochs and context, bf16
compute, AdamW (the trainer's optimizer) with the learning rate of the shapes recipe, a linear warm-up epoch, no
augmentation (the image embeddings are computed once). `,all` (after the set, or after `ctxv1`) trains on every
class for the same 200 epochs: `--config.few_shot.classes=all` alone would keep the steps of the base half (100
epochs), as the recipe counts its steps before the overrides.
"""

from clip_jax.config import default_config
from configs.common import few_shot_arg, few_shot_b16


def get_config(arg: str = "oxford_flowers102"):
    dataset, variant, classes = few_shot_arg(arg, {"ctxv1": "M = 4, 'a photo of a'; without it M = 16, random"})
    fields = {"n_ctx": 4, "ctx_init": "a photo of a"} if variant else {"n_ctx": 16}
    config = few_shot_b16(default_config(), "coop", dataset, epochs=200, batch=32, classes=classes, **fields)
    config.optimizer.lr = 2e-3
    config.optimizer.weight_decay = 5e-4
    return config
