r"""Long-CLIP fine-tuning recipe (arXiv 2403.15378; the reference repo's train.md) for a converted OpenAI ViT-B/16:
ShareGPT4V's 1.25M long captions, global batch 2048, AdamW lr 1e-6, wd 1e-2, betas (0.9, 0.999), eps 1e-8,
6 epochs with 200 warm-up steps then cosine, 248 tokens with the first 20 positions frozen, primary component
matching (32 components per device batch, label smoothing 0.1, 1:1), temperature reset to 100 and not clamped.

  clip-jax convert ViT-B-16.safetensors --to-workdir runs/b16            # OpenAI weights (QuickGELU)
  clip-jax stretch --workdir runs/b16 --out-workdir runs/longclip-b16 --keep 20 --ratio 4
  clip-jax train --config configs/longclip_b16.py --workdir runs/longclip-b16 \
      --config.data.path=/data/sharegpt4v/share-captioner_coco_lcs_sam_1246k_1107.json \
      --config.data.image_root=/data/sharegpt4v/data

The argument picks the preset (configs/longclip_l14.py is `:L/14`).
"""

import math

from clip_jax.config import default_config, method_config
from clip_jax.models.presets import model_preset

SHAREGPT4V_PAIRS = 1_246_000  # "1246k" of the file name
HELD_OUT = 1_000  # the first 1,000 records are the ShareGPT4V-1k test set
EPOCHS, BATCH = 6, 2048


def get_config(preset: str = "B/16"):
    config = default_config()
    config.model = model_preset(preset, context_length=248)  # OpenAI sizes, QuickGELU, OpenAI's vocabulary
    config.model.text.keep_positions = 20
    config.model.dtype = "bfloat16"  # bf16 compute on GPU/TPU (the reference: fp16 autocast); fp32 parameters
    config.model.remat_policy = "dots_no_batch"
    config.model.logit_scale_init = math.log(100)  # the reference resets logit_scale to ln 100 ...
    config.model.max_logit_scale = 0.0  # ... and does not clamp it
    config.data.tokenizer = "openai"
    config.data.source = "sharegpt4v"
    config.data.skip = HELD_OUT
    config.data.augment = False  # no augmentation: resize + centre crop
    config.data.long_caption_prob = 1.0  # the text is the long caption; short_text its first sentence
    config.data.workers = 8  # JPEG decoding
    config.batch_size = BATCH
    config.total_steps = EPOCHS * (SHAREGPT4V_PAIRS - HELD_OUT) // BATCH  # 3647
    config.method = method_config(
        "longclip",
        label_smoothing=0.1,
        pca_components=32,
        pca_scope="local",  # the reference: 128 rows per GPU; on fewer devices "global" is closer
        reset_logit_scale=True,  # the stretched checkpoint holds the base model's temperature
    )
    config.optimizer.lr = 1e-6
    config.optimizer.warmup_steps = 200
    config.optimizer.weight_decay = 1e-2
    config.optimizer.b1, config.optimizer.b2, config.optimizer.eps = 0.9, 0.999, 1e-8
    config.optimizer.grad_clip_norm = 0.0  # the reference does not clip
    config.optimizer.no_decay = ()  # the reference's AdamW decays every parameter
    config.optimizer.frozen = (r"^text/positional_embedding$",)  # the kept first 20 positions
    config.checkpoint.every_steps = 500
    config.eval.every_steps = 0
    config.log.every_steps = 20
    return config
