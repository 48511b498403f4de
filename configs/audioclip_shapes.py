"""AudioCLIP on `shapes`: an audio tower trained into the demo CLIP's space, on a CPU (docs/audioclip.md).

  clip-jax train --config configs/demo.py --workdir workdirs/demo                                  # first
  clip-jax train --config configs/audioclip_shapes.py:partial --workdir workdirs/audioclip_partial
  clip-jax train --config configs/audioclip_shapes.py:full --workdir workdirs/audioclip_full

Every scene sounds (data/audio.py): the salient object's colour is the pitch, its shape the timbre; the others are
quieter; noise at 0-30 dB SNR. The audio tower (models/audio.py) is a tiny ViT over a 1 s, 8 kHz log-mel
spectrogram (64 mel bands, 61 frames) in patches of 8 frames x 8 bands: 56 tokens, about the image tower's 36.

- "partial" (the paper's Partial): image and text towers and their temperature frozen at the demo's; the loss is the
  audio-text and audio-image pairs'. CLIP's own image-text zero-shot cannot change.
- "full": all three towers train, on all three pairs, from the same start.
Both start from workdirs/demo (its towers, its tokenizer) and keep its data settings, batch and learning rate.
"""

from clip_jax.config import method_config
from clip_jax.evaluate.suite import eval_defaults
from configs.demo import get_config as demo_config

TRAINING = ("partial", "full")


def get_config(training: str = "partial"):
    if training not in TRAINING:
        raise ValueError(f"unknown training {training!r}; choose one of {TRAINING}")
    config = demo_config("b128")  # the demo recipe its results were measured with
    config.init_from = "workdirs/demo"
    v = config.model.vision
    config.model.audio = dict(type="spectrogram_vit", width=v.width, layers=v.layers, heads=v.heads,
                              head_dim=v.head_dim, mlp_dim=v.mlp_dim, sample_rate=8000, num_samples=8000, n_fft=256,
                              hop=128, n_mels=64, patch_time=8, patch_freq=8)
    pairs = ("audio_text", "audio_image") if training == "partial" else ("audio_text", "audio_image", "image_text")
    config.method = method_config("audioclip", multi_positive=config.method.multi_positive, pairs=pairs)
    if training == "partial":
        config.optimizer.frozen = (r"^visual/", r"^text/", r"^logit_scale$")
    config.total_steps = 1000
    config.optimizer.warmup_steps = 100
    config.evals = {"shapes": eval_defaults("shapes"), "shapes_audio": eval_defaults("shapes_audio")}
    return config
