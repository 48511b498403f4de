"""The audio tower (AudioCLIP): a log-mel spectrogram computed on device, then a ViT over its time-frequency patches.

Why a spectrogram transformer rather than the reference's ESResNeXt-fbsp (a ResNeXt-50 with BatchNorm on a learned
STFT): there are no pretrained weights to import here (nothing reaches the network), so the tower trains from scratch;
a transformer reuses the blocks, logical sharding names, remat, scan and FLOPs formula of the other towers, and has
no BatchNorm, whose batch statistics would make a step depend on how the batch is split (METHODS.md G2). The
spectrogram is computed in the graph from the waveform: the host sends 1 float per sample (8,000 for a second at
8 kHz) instead of a feature array, and its matmuls run on the accelerator.

Features: frames of `n_fft` samples every `hop` (no padding), a periodic Hann window, the power spectrum, `n_mels`
triangular filters on the HTK mel scale (mel = 2595 log10(1 + f / 700)) between 0 and the Nyquist frequency, then
log10 with an 80 dB floor below the example's peak, scaled by (x + 4) / 4 (Whisper's choice: values near [-1, 1]).
Patches of `patch_time x patch_freq` over the [frames, n_mels] image (the frames that do not fill a patch dropped)
are the tokens; a class token, learned positions, pre-LN blocks, LayerNorm and a projection give the embedding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.models.layers import (
    Dtype,
    LayerNorm,
    PatchEmbedding,
    TowerOutput,
    Transformer,
    class_token_and_positions,
    partitioned,
)
from clip_jax.models.towers import TowerConfig


@dataclasses.dataclass(frozen=True)
class AudioConfig(TowerConfig):
    type: str = "spectrogram_vit"
    sample_rate: int = 8000
    num_samples: int = 8000  # the clip length the tower takes (1 s at 8 kHz)
    n_fft: int = 256
    hop: int = 128
    n_mels: int = 64
    patch_time: int = 4  # frames per patch
    patch_freq: int = 8  # mel bands per patch

    @property
    def frames(self) -> int:
        return 1 + (self.num_samples - self.n_fft) // self.hop

    @property
    def grid(self) -> tuple[int, int]:
        """Patches along time and frequency."""
        return self.frames // self.patch_time, self.n_mels // self.patch_freq

    @property
    def feature_width(self) -> int:
        return self.width


def config_problem(audio: dict[str, Any]) -> str | None:
    """One line saying why a `model.audio` dict cannot build a tower, or None."""
    cfg = AudioConfig.from_dict(audio)
    for name in ("width", "layers", "heads", "head_dim", "mlp_dim", "sample_rate", "num_samples", "n_fft", "hop",
                 "n_mels", "patch_time", "patch_freq"):
        if getattr(cfg, name) < 1:
            return f"config key 'model.audio.{name}' must be >= 1, got {getattr(cfg, name)}"
    if cfg.num_samples < cfg.n_fft:
        return f"model.audio.num_samples {cfg.num_samples} is shorter than one frame (n_fft {cfg.n_fft})"
    if min(cfg.grid) < 1:
        return (f"model.audio: {cfg.frames} frames x {cfg.n_mels} mel bands hold no {cfg.patch_time}x{cfg.patch_freq}"
                " patch; lower patch_time/patch_freq or lengthen num_samples")
    return None


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """[n_fft // 2 + 1, n_mels] triangular filters: filter m rises from edge m to its centre m + 1 and falls to edge
    m + 2, edges evenly spaced in mel from 0 to the Nyquist frequency, each evaluated at the FFT bins' frequencies."""
    edges = mel_to_hz(np.linspace(0.0, hz_to_mel(sample_rate / 2), n_mels + 2))
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)[:, None]
    rising = (bins - edges[:-2]) / (edges[1:-1] - edges[:-2])
    falling = (edges[2:] - bins) / (edges[2:] - edges[1:-1])
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def power_spectrogram(waveform: jax.Array, n_fft: int, hop: int) -> jax.Array:
    """|STFT|^2 [B, frames, n_fft // 2 + 1] of float waveforms [B, S]: periodic Hann window, no padding."""
    frames = 1 + (waveform.shape[-1] - n_fft) // hop
    index = np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    spectrum = jnp.fft.rfft(waveform.astype(jnp.float32)[:, index] * window.astype(np.float32), axis=-1)
    return jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2


def log_mel_spectrogram(waveform: jax.Array, cfg: AudioConfig) -> jax.Array:
    """[B, frames, n_mels] features of float waveforms [B, num_samples] in [-1, 1] (module docstring)."""
    mel = power_spectrogram(waveform, cfg.n_fft, cfg.hop) @ mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels)
    log_mel = jnp.log10(jnp.maximum(mel, 1e-10))
    log_mel = jnp.maximum(log_mel, jnp.max(log_mel, axis=(1, 2), keepdims=True) - 8.0)
    return (log_mel + 4.0) / 4.0


class AudioTransformer(nn.Module):
    """Spectrogram ViT (module docstring): waveforms float [B, num_samples] -> `TowerOutput`."""

    config: AudioConfig
    embed_dim: int
    dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention: str = "auto"  # layers.ATTENTION_IMPLEMENTATIONS
    layer_norm: str = "auto"  # layers.LAYER_NORM_IMPLEMENTATIONS

    @nn.compact
    def __call__(self, waveform: jax.Array) -> TowerOutput:
        cfg = self.config
        if waveform.ndim != 2 or waveform.shape[1] != cfg.num_samples:
            raise ValueError(f"audio tower expects a batch of waveforms [N, {cfg.num_samples}], got shape "
                             f"{tuple(waveform.shape)}; pad or crop them (data/audio.py read_wav does), add the batch "
                             "axis to one waveform, or set model.audio.num_samples")
        times, freqs = cfg.grid
        features = log_mel_spectrogram(waveform, cfg)[:, :times * cfg.patch_time, :freqs * cfg.patch_freq]
        x = PatchEmbedding(cfg.width, (cfg.patch_time, cfg.patch_freq), self.dtype, name="conv1")(features[..., None])
        x = class_token_and_positions(self, x.reshape(x.shape[0], times * freqs, cfg.width), self.dtype)
        x = LayerNorm(self.dtype, name="ln_pre")(x)
        x = Transformer(
            cfg.layers, cfg.heads, cfg.head_dim, cfg.mlp_dim, cfg.activation, causal=False,
            scan_layers=self.scan_layers, remat_policy=self.remat_policy, dtype=self.dtype, attention=self.attention,
            layer_norm=self.layer_norm, name="transformer",
        )(x)
        pooled = LayerNorm(self.dtype, name="ln_post")(x[:, 0])
        proj = self.param("proj", partitioned(nn.initializers.normal(cfg.width**-0.5), ("embed", "proj")),
                          (cfg.width, self.embed_dim), jnp.float32)
        return TowerOutput(pooled @ proj.astype(self.dtype), x, pooled)
