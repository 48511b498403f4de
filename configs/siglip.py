"""SigLIP pretraining (Zhai et al. 2023) for any preset: configs/pretrain.py's recipe with the pairwise sigmoid loss
and the paper's initialisation.

  clip-jax train --config configs/siglip.py:B/16 --workdir gs://bucket/runs/siglip-b16 --config.mesh.fsdp=-1

The paper starts the temperature at 10 and the bias at -10, about -ln of its 32k batch: the prior odds of a
positive pair, so that the first steps are not spent pushing every negative pair down. A bias that starts far from
-ln(batch) moves slowly (Adam moves it by about the learning rate a step): for a much smaller batch set
`--config.model.logit_bias_init` near -ln(batch_size). On the demo's 1,200-step runs the sigmoid loss trailed the
softmax loss from either start (docs/demo.md, seventeenth and eighteenth rounds). `--config.method.ring=True`
passes text shards round the devices instead of all-gathering them.
"""

import math

from clip_jax.config import method_config
from configs import pretrain


def get_config(preset: str = "B/16"):
    config = pretrain.get_config(preset)
    config.method = method_config("siglip")
    config.model.logit_scale_init = math.log(10.0)
    config.model.logit_bias_init = -10.0
    config.model.max_logit_scale = 0.0  # the paper does not clamp the temperature (CLIP clamps it at 100)
    return config
