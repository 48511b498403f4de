"""The demo: the tiny model trained from scratch on the procedural `shapes` dataset, on a CPU, in minutes.

  clip-jax train --config configs/demo.py --workdir workdirs/demo

What mattered on a 2-core CPU (measured with docs/demo.md's runs): 96 px images with 16 px patches (36 patches:
at 64 px an object covers about one patch and the model learned colour but not shape, top-1 on seen pairs stayed
near 0.4); a short text context (24 tokens: captions are short, and text tokens cost as much as image tokens);
long captions for 40% of the examples (they name colour and shape in varied orders); captions naming only the
colour or only the shape, the latter with a grayscale image, so that shape features do not depend on colour; a batch
of 128 for 1,500 steps rather than 64 for 2,000 (twice the negatives per step: the one held-out pair that the
smaller batch never learnt, green cross, is then partly right).
"""

from clip_jax.config import default_config
from configs.common import tiny_shapes


def get_config():
    config = default_config()
    config.total_steps = 1500
    config.batch_size = 128
    tiny_shapes(config, context_length=24)
    config.data.min_objects = 1
    config.data.max_objects = 3
    config.data.long_caption_prob = 0.4
    config.data.partial_caption_prob = 0.3
    config.data.grayscale_shape_captions = True
    # Short captions repeat within a batch ("a red circle."): treat identical captions as positives.
    config.method.multi_positive = True
    config.optimizer.lr = 1e-3
    config.optimizer.warmup_steps = 200
    config.optimizer.weight_decay = 0.1
    config.checkpoint.every_steps = 500
    config.eval.every_steps = 500
    config.log.every_steps = 25
    return config
