r"""The linear probe (CoOp's baseline) for ViT-B/16 on a TFDS set:

  clip-jax convert ViT-B-16.safetensors --to-workdir runs/b16            # OpenAI weights (QuickGELU)
  clip-jax train --config configs/linear_probe/b16.py --workdir runs/linear_probe-flowers \
      --config.few_shot.tfds_data_dir=/data/tfds

The reference fits scikit-learn's L-BFGS logistic regression on the frozen image features, its L2 strength searched
on the validation split. Here: the same features (computed once) and K shots, logistic regression trained with
AdamW for the shapes recipe's epochs, its weight decay as the L2 term (search it on val with
--config.optimizer.weight_decay). A probe has no weights for classes it never saw: it reports base classes only,
or with `:<set>,all` trains on every class for the same epochs (`--config.few_shot.classes=all` alone would keep
the base half's steps, counted before the overrides).
"""

from clip_jax.config import default_config
from configs.common import few_shot_arg, few_shot_b16


def get_config(arg: str = "oxford_flowers102"):
    dataset, _, classes = few_shot_arg(arg)
    config = few_shot_b16(default_config(), "linear_probe", dataset, epochs=100, batch=32, classes=classes)
    config.optimizer.lr = 1e-2
    config.optimizer.weight_decay = 1e-3
    return config
