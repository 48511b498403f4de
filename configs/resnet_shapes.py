"""The demo (configs/demo.py) with a small ModifiedResNet image tower in place of the tiny ViT: the comparison of
docs/resnet.md (benchmarks/resnet_shapes.py), on a CPU.

  clip-jax train --config configs/resnet_shapes.py --workdir workdirs/resnet_shapes
  clip-jax train --config configs/resnet_shapes.py:frozen_bn --workdir workdirs/resnet_shapes_bn

The tower: configs/common.py's small_resnet. Trained from scratch, so GroupNorm ("group") by default: "frozen_bn"
is OpenAI's BatchNorm as an affine without statistics (models/resnet.py), a network without normalisation from
scratch.
"""

from configs.common import small_resnet
from configs.demo import get_config as demo_config

NORMS = {"group": "group", "frozen_bn": "frozen_bn"}


def get_config(norm: str = "group"):
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {sorted(NORMS)}")
    config = demo_config("b128")  # the demo recipe its results were measured with
    config.model.vision = small_resnet(NORMS[norm])
    return config
