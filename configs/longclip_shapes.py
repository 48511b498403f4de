"""Long-CLIP on `shapes`, CPU-sized: the tiny model at 96 px, a 77-token base stretched to 248 tokens and
fine-tuned on scenes of 6-8 objects, whose long captions (about 125-210 tokens) do not fit in 77.

The argument picks the phase (docs/longclip.md runs all of them, benchmarks/longclip_ablation.py reproduces it):
  base         pretraining at 77 tokens on mostly short captions of 1-3 objects (demo-like)
  longclip     fine-tune a keep-20 stretched base with primary component matching (the default)
  keep         the same stretched base, long captions with the plain CLIP loss
  interpolate  a base stretched by plain interpolation (one table, nothing frozen), plain CLIP loss

  clip-jax train   --config configs/longclip_shapes.py:base --workdir workdirs/lc_base
  clip-jax stretch --workdir workdirs/lc_base --out-workdir workdirs/lc_keep --keep 20 --ratio 4
  clip-jax train   --config configs/longclip_shapes.py --workdir workdirs/lc_keep
"""

import math

from clip_jax.config import default_config, method_config
from clip_jax.evaluate.suite import eval_defaults
from configs.common import tiny_shapes

PHASES = ("base", "longclip", "keep", "interpolate")


def get_config(phase: str = "longclip"):
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; choose one of {PHASES}")
    config = default_config()
    # The base's BPE vocabulary is fitted on its captions; fine-tunes reuse the workdir's tokenizer.json.
    tiny_shapes(config, context_length=77)
    config.method.multi_positive = True  # short shapes captions repeat within a batch ("a red circle.")
    config.log.every_steps = 25
    config.log.progress_bar = False
    config.evals.shapes_long_text = eval_defaults("shapes_long_text")  # long captions and the hard-pairs test
    config.eval.num_examples = 500
    if phase == "base":  # configs/demo.py's first recipe (batch 64, 2,000 steps; the ablation's base), at 77 tokens
        config.total_steps = 2000
        config.batch_size = 64
        config.data.min_objects, config.data.max_objects = 1, 3
        config.data.long_caption_prob = 0.4
        config.data.partial_caption_prob = 0.3
        config.optimizer.lr = 1e-3
        config.optimizer.warmup_steps = 200
        config.optimizer.weight_decay = 0.1
        config.checkpoint.every_steps = 1000
        return config

    # Fine-tuning: the base's model with 248 positions, on long captions of many objects.
    config.model.text.context_length = 248
    config.model.text.keep_positions = 0 if phase == "interpolate" else 20
    if phase != "interpolate":
        config.optimizer.frozen = (r"^text/positional_embedding$",)  # the kept first 20 positions
    config.total_steps = 150
    config.batch_size = 64
    config.data.min_objects, config.data.max_objects = 6, 8
    config.data.long_caption_prob = 1.0
    config.optimizer.lr = 1e-4
    config.optimizer.warmup_steps = 15
    config.optimizer.weight_decay = 1e-2
    config.checkpoint.every_steps = 1000
    # Long-CLIP restarts the temperature at ln 100 and lets it go past CLIP's clamp of 100.
    config.model.logit_scale_init = math.log(100)
    config.model.max_logit_scale = 0.0
    config.method.reset_logit_scale = True
    if phase == "longclip":
        # a batch of 64: the reference keeps 32 components of 128
        config.method = method_config("longclip", label_smoothing=0.1, pca_components=16, multi_positive=True,
                                      reset_logit_scale=True)
    return config
