"""The demo: the tiny model trained from scratch on the procedural `shapes` dataset, on a CPU, in minutes.

  clip-jax train --config configs/demo.py --workdir workdirs/demo
"""

from clip_jax.config import default_config
from clip_jax.models.presets import model_preset


def get_config():
    config = default_config()
    config.total_steps = 1500
    config.batch_size = 128
    # 64 px images, 16 px patches: 16 image tokens. Token count decides CPU speed (8 px patches: 4x slower).
    config.model = model_preset("tiny", vocab_size=1024, context_length=77)
    config.data.tokenizer = "train"  # a 1024-token BPE fitted on the training captions
    config.data.tokenizer_vocab_size = 1024
    config.data.min_objects = 1
    config.data.max_objects = 3
    config.data.long_caption_prob = 0.25  # mostly short captions; some long ones for retrieval
    # Short captions repeat within a batch ("a red circle."): treat identical captions as positives.
    config.loss.multi_positive = True
    config.optimizer.lr = 1e-3
    config.optimizer.warmup_steps = 100
    config.optimizer.weight_decay = 0.1
    config.checkpoint.every_steps = 500
    config.eval.every_steps = 500
    config.log.every_steps = 25
    return config
