r"""Long-CLIP fine-tuning recipe for a converted OpenAI ViT-L/14: configs/longclip_b16.py with the L/14 preset.

  clip-jax convert ViT-L-14.safetensors --to-workdir runs/l14
  clip-jax stretch --workdir runs/l14 --out-workdir runs/longclip-l14 --keep 20 --ratio 4
  clip-jax train --config configs/longclip_l14.py --workdir runs/longclip-l14 --config.data.path=... \
      --config.data.image_root=...
"""

from configs import longclip_b16


def get_config():
    return longclip_b16.get_config("L/14")
