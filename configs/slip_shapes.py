"""SLIP on `shapes`: the demo (configs/demo.py) with SimCLR beside the CLIP loss, on a CPU.

  clip-jax train --config configs/slip_shapes.py --workdir workdirs/slip_shapes            # the reference's views
  clip-jax train --config configs/slip_shapes.py:colour --workdir workdirs/slip_colour     # colour-preserving views

The argument picks the views' augmentations (data/augment.py): "simclr", the reference's (colour jitter and
grayscale make the self-supervised features ignore colour, which the colour-shape pairs need), or "colour". The
head is the reference's shape at the tiny model's scale (512 hidden, 128 out); NT-Xent at temperature 0.1 and
weight 1, as in the paper. A step costs about three times CLIP's (three image-tower passes).
"""

from clip_jax.config import method_config
from clip_jax.data.augment import SSL_AUGMENTATIONS
from configs.demo import get_config as demo_config


def get_config(augmentation: str = "simclr"):
    if augmentation not in SSL_AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augmentation!r}; choose one of {SSL_AUGMENTATIONS}")
    config = demo_config("b128")  # the demo recipe its results were measured with
    # The demo's method fields (multi-positive captions) carry over to SLIP's CLIP loss.
    config.method = method_config("slip", multi_positive=config.method.multi_positive, ssl_hidden=512, ssl_dim=128,
                                  augmentation=augmentation)
    return config
