"""AudioCLIP (Guzhov et al., ICASSP 2022): a third, audio tower in CLIP's embedding space.

The model is CLIP with `model.audio` set (the tower of models/audio.py) and two more learned temperatures, one per
pair with audio (`logit_scale_audio_image`, `logit_scale_audio_text`, initialised like the reference's at 100 and
clamped like CLIP's). The loss is the symmetric InfoNCE of each modality pair in `method.pairs`, averaged
(losses.pairwise_clip_loss; the reference divides by the factorial of the pair count instead, see
docs/audioclip.md). Training is "partial" when the image and text towers and their temperature are frozen
(`optimizer.frozen`, configs/audioclip_shapes.py:partial): the audio tower learns CLIP's space and CLIP's image-text
embeddings stay exactly as they were; "full" trains all three towers.

Data: the `shapes` scenes have a sound (data/audio.py: pitch from the salient object's colour, timbre from its
shape, quieter tones for the other objects, noise at a random SNR), rendered in the input pipeline from the scene
with the example's own generator, so it is deterministic and resumes exactly. Audio-image-text files are not a
training source yet; labelled WAV folders (ESC-50's layout) are evaluated by `zero_shot_audio_folder`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import losses
from clip_jax.data.audio import scene_waveform
from clip_jax.data.pipeline import FieldHook
from clip_jax.errors import ConfigError
from clip_jax.methods.base import Field, StepFns
from clip_jax.methods.clip import ClipConfig, ClipMethod
from clip_jax.models import flops
from clip_jax.models.clip import CLIP
from clip_jax.sharding import match_any, param_paths

# The modality pairs a loss can score: (first, second, its temperature, whether identical captions are positives
# of each other under `multi_positive`: only pairs with text have captions to compare).
PAIRS: dict[str, tuple[str, str, str, bool]] = {
    "audio_text": ("audio", "text", "logit_scale_audio_text", True),
    "audio_image": ("audio", "image", "logit_scale_audio_image", False),
    "image_text": ("image", "text", "logit_scale", True),
}
AUDIO_SCALES = ("logit_scale_audio_image", "logit_scale_audio_text")
# The parameters of each modality's tower (a pair trains if a tower of it does).
TOWERS = {"audio": "audio", "image": "visual", "text": "text"}


@dataclasses.dataclass(frozen=True)
class AudioClipConfig(ClipConfig):
    pairs: tuple[str, ...] = ("audio_text", "audio_image", "image_text")  # keys of PAIRS
    audio_logit_scale_init: float = math.log(100.0)  # the reference's
    snr_db: tuple[float, float] = (0.0, 30.0)  # shapes: noise of each training sound, SNR drawn from this range


class AudioCLIP(CLIP):
    """CLIP with its audio tower (`config.audio`) and the audio pairs' temperatures: parameters `visual`, `text`,
    `audio`, `logit_scale`, `logit_scale_audio_image`, `logit_scale_audio_text`."""

    audio_logit_scale_init: float = math.log(100.0)

    def setup(self):
        super().setup()
        init = nn.initializers.constant(self.audio_logit_scale_init)
        self.logit_scale_audio_image = self.param("logit_scale_audio_image", init, (), jnp.float32)
        self.logit_scale_audio_text = self.param("logit_scale_audio_text", init, (), jnp.float32)

    def audio_temperatures(self) -> dict[str, jax.Array]:
        """The audio pairs' multipliers of cosine similarities, clamped like CLIP's (`CLIP.temperature`)."""
        return {"logit_scale_audio_image": self.clamped_scale(self.logit_scale_audio_image),
                "logit_scale_audio_text": self.clamped_scale(self.logit_scale_audio_text)}

    def __call__(self, images: jax.Array, tokens: jax.Array, waveforms: jax.Array) -> dict[str, jax.Array]:
        return {**super().__call__(images, tokens), "audio": self.encode_audio(waveforms), **self.audio_temperatures()}


@dataclasses.dataclass(frozen=True)
class SceneSound:
    """The pipeline's hook (`TrainExample`'s `add_fields`): `audio`, float32 [num_samples], the sound of a shapes
    example's scene with noise at an SNR drawn from `snr_db` (data/audio.py). Picklable for grain's workers."""

    sample_rate: int
    num_samples: int
    snr_db: tuple[float, float]

    def __call__(self, example: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        sound = scene_waveform(example["scene"], rng, self.sample_rate, self.num_samples / self.sample_rate,
                               tuple(self.snr_db))
        return {"audio": np.asarray(sound, np.float32)}


class AudioClipMethod(ClipMethod):
    """CLIP's batch plus each example's sound; the pairwise InfoNCE of the configured modality pairs."""

    name = "audioclip"
    Config = AudioClipConfig

    def __init__(self, config):
        super().__init__(config)
        h = self.hparams
        if "audio" not in config.model:
            raise ConfigError("method audioclip needs an audio tower: set model.audio (configs/audioclip_shapes.py "
                              "has one)")
        if config.data.source != "shapes":
            raise ConfigError(f"method audioclip trains on data.source 'shapes' (its scenes have sounds); "
                              f"{config.data.source!r} has no audio. Your own WAV files are encoded (clip-jax encode "
                              "--audio) and evaluated (a zero_shot_audio_folder entry) with such a run: "
                              "docs/audioclip.md")
        unknown = [p for p in h.pairs if p not in PAIRS]
        if unknown or not h.pairs or len(set(h.pairs)) != len(h.pairs):
            raise ConfigError(f"method.pairs {tuple(h.pairs)} must be distinct names among {', '.join(PAIRS)}")
        if not len(h.snr_db) == 2 or h.snr_db[0] > h.snr_db[1]:
            raise ConfigError(f"method.snr_db must be (low, high) with low <= high, got {tuple(h.snr_db)}")

    def check(self, mesh) -> None:
        super().check(mesh)
        # A loss whose pairs reach only frozen towers has no gradient for any of them: steps that train no tower
        # (Partial's frozen image and text towers with pairs=('image_text',)).
        frozen, pairs = tuple(self.config.optimizer.frozen), tuple(self.hparams.pairs)
        boxed = jax.eval_shape(self.model().init, jax.random.PRNGKey(0), *self.init_inputs())["params"]
        paths = jax.tree.leaves(param_paths(nn.unbox(boxed)))
        trains = {m: any(p.startswith(f"{TOWERS[m]}/") and not match_any(frozen, p) for p in paths) for m in TOWERS}
        used = {m for p in pairs for m in PAIRS[p][:2]}
        if not any(trains[m] for m in used):
            idle = [m for m in TOWERS if trains[m] and m not in used]
            fix = [p for p in PAIRS if any(trains[m] for m in PAIRS[p][:2])]
            raise ConfigError(
                f"method.pairs {pairs} trains no tower: optimizer.frozen freezes the {' and '.join(sorted(used))} "
                f"towers" + (f" and the {' and '.join(idle)} tower that trains is in no pair" if idle else "")
                + (f": add a pair with a tower that trains ({', '.join(fix)}; configs/audioclip_shapes.py:partial "
                   "scores audio_text and audio_image)" if fix else ": unfreeze a tower of one of them")
            )

    def fields(self) -> dict[str, Field]:
        return {**super().fields(), "audio": Field((self.model_config().audio.num_samples,), np.float32)}

    def model(self) -> AudioCLIP:
        return AudioCLIP(self.model_config(), self.hparams.audio_logit_scale_init)

    def init_inputs(self) -> tuple[np.ndarray, ...]:
        fields = self.fields()
        return tuple(np.zeros((1, *fields[k].shape), fields[k].dtype) for k in ("image", "text", "audio"))

    def field_hooks(self) -> tuple[FieldHook, ...]:
        a = self.model_config().audio
        return (SceneSound(a.sample_rate, a.num_samples, tuple(self.hparams.snr_db)), *super().field_hooks())

    def loss_fn(self):
        h = self.hparams
        pairs = tuple((a, b, scale, multi and h.multi_positive) for a, b, scale, multi in (PAIRS[p] for p in h.pairs))
        return lambda outputs, *, axis_name: losses.pairwise_clip_loss(
            outputs, axis_name=axis_name, pairs=pairs, label_smoothing=h.label_smoothing)

    def step_fns(self, model: AudioCLIP) -> StepFns:
        fns = super().step_fns(model)

        def embed(params, batch, rng):
            audio = model.apply({"params": params}, batch["audio"], method=CLIP.encode_audio)
            return {**fns.embed(params, batch, rng), "audio": audio}

        def shared(params):
            return {**fns.shared(params), **model.apply({"params": params}, method=AudioCLIP.audio_temperatures)}

        return dataclasses.replace(fns, embed=embed, shared=shared,
                                   log=lambda s: {k: s[k] for k in ("logit_scale", *AUDIO_SCALES)})

    def base_params(self, params):
        """A warm start (init_from a CLIP run or a converted model) reads the image-text model; the audio tower and
        its temperatures start anew."""
        return {k: v for k, v in params.items() if k not in ("audio", *AUDIO_SCALES)}

    def warm_start(self, restored, initial):
        return {**super().warm_start(restored, initial), **{k: initial[k] for k in ("audio", *AUDIO_SCALES)}}

    def flops_per_example(self, trainable: Mapping[str, Any]) -> float:
        """CLIP's (a frozen tower: one forward), plus the audio tower's."""
        return (super().flops_per_example(trainable)
                + flops.pass_factor(trainable["audio"]) * flops.audio_forward_flops(self.model_config()))
