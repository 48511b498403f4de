r"""Tip-Adapter's recipe for ViT-B/16, base-to-new on a TFDS set: training-free, or `:<set>,f` for Tip-Adapter-F.

  clip-jax convert ViT-B-16.safetensors --to-workdir runs/b16            # OpenAI weights (QuickGELU)
  clip-jax train --config configs/tip_adapter/b16.py --workdir runs/tip-flowers \
      --config.few_shot.tfds_data_dir=/data/tfds
  clip-jax train --config configs/tip_adapter/b16.py:oxford_flowers102,f --workdir runs/tip_f-flowers

The reference (RN50; the method is backbone-agnostic): 16 shots, a cache of the K-shot embeddings (averaged over 10
augmented passes), alpha and beta searched on a grid; Tip-Adapter-F: the keys fine-tuned with AdamW lr 1e-3, eps
1e-4, cosine, batch 256, 20 epochs. Here: the same shots and Tip-F optimizer, batch and epochs, bf16 compute, one
unaugmented pass for the cache, alpha and beta chosen on the val split (the reference searches ImageNet's on the
test set, METHODS.md 5.4). `,all` (`:<set>,all`, `:<set>,f,all`) caches and trains on every class (Tip-Adapter-F:
the same 20 epochs, over all of them; `--config.few_shot.classes=all` alone would keep the base half's steps).
"""

from clip_jax.config import default_config
from configs.common import few_shot_arg, few_shot_b16


def get_config(arg: str = "oxford_flowers102"):
    dataset, variant, classes = few_shot_arg(arg, {"f": "Tip-Adapter-F; without it training-free"})
    fine_tune = variant == "f"
    config = few_shot_b16(
        default_config(), "tip_adapter", dataset, epochs=20 if fine_tune else 1, batch=256, classes=classes,
        fine_tune=fine_tune,
    )
    if fine_tune:
        config.optimizer.lr = 1e-3
        config.optimizer.eps = 1e-4
        config.optimizer.weight_decay = 0.0
    else:
        config.total_steps = 1
        config.optimizer.warmup_steps = 0
        config.optimizer.frozen = (*config.optimizer.frozen, "^learner/")
    return config
