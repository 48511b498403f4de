"""Self-supervised image views (SLIP): two random augmentations of each training image, made in the grain map
with the example's own generator, so they are deterministic and resume exactly like the rest of the pipeline.

Two sets (`SSL_AUGMENTATIONS`):
- "simclr", the reference's: random resized crop of 8-100% of the area, horizontal flip, colour jitter
  (brightness, contrast, saturation 0.4, hue 0.1; in random order) with probability 0.8, grayscale with
  probability 0.2, Gaussian blur (sigma 0.1-2 px) with probability 0.5. Its features learn to ignore colour.
- "colour": colour-preserving, for tasks where colour is the label (shapes' colour-shape pairs): random resized
  crop of 50-100% (an object survives the crop), flip and blur; no jitter, no grayscale.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from clip_jax.data.images import random_resized_crop

SSL_AUGMENTATIONS = ("simclr", "colour")
_GRAY = np.array([0.299, 0.587, 0.114], np.float32)


def _rgb_to_hsv(x: np.ndarray) -> np.ndarray:
    high, low = x.max(-1), x.min(-1)
    delta = high - low
    safe = np.where(delta > 0, delta, 1.0)
    r, g, b = np.moveaxis(x, -1, 0)
    hue = np.where(high == r, (g - b) / safe, np.where(high == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = np.where(delta > 0, (hue / 6.0) % 1.0, 0.0)
    saturation = np.where(high > 0, delta / np.where(high > 0, high, 1.0), 0.0)
    return np.stack([hue, saturation, high], -1)


def _hsv_to_rgb(x: np.ndarray) -> np.ndarray:
    h, s, v = np.moveaxis(x, -1, 0)
    sector = np.floor(h * 6.0)
    f = h * 6.0 - sector
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    sector = sector.astype(np.int64) % 6
    choices = [np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]
    return np.choose(sector[..., None], choices)


def grayscale(x: np.ndarray) -> np.ndarray:
    return np.repeat((x @ _GRAY)[..., None], 3, axis=-1)


def colour_jitter(x: np.ndarray, rng: np.random.Generator, brightness: float = 0.4, contrast: float = 0.4,
                  saturation: float = 0.4, hue: float = 0.1) -> np.ndarray:
    """torchvision's ColorJitter on a float image in [0, 1]: the four adjustments in a random order, each by a
    factor drawn from [1 - s, 1 + s] (hue: a shift drawn from [-hue, hue] of the colour circle). An adjustment of
    strength 0 is skipped and draws nothing (a hue of 0 saves the HSV round trip, ~2 ms at 96 px)."""
    strengths = (brightness, contrast, saturation, hue)

    def adjust(op: int, x: np.ndarray) -> np.ndarray:
        if op == 0:
            return x * rng.uniform(1 - brightness, 1 + brightness)
        if op == 1:
            mean = (x @ _GRAY).mean()
            return (x - mean) * rng.uniform(1 - contrast, 1 + contrast) + mean
        if op == 2:
            gray = grayscale(x)
            return gray + (x - gray) * rng.uniform(1 - saturation, 1 + saturation)
        hsv = _rgb_to_hsv(x)
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-hue, hue)) % 1.0
        return _hsv_to_rgb(hsv)

    for op in rng.permutation(4):
        if strengths[op] > 0:
            x = np.clip(adjust(int(op), x), 0.0, 1.0)
    return x


def ssl_view(image: np.ndarray, size: int, rng: np.random.Generator, kind: str) -> np.ndarray:
    """One augmented view (module docstring), uint8 [size, size, 3]."""
    x = random_resized_crop(image, size, rng, (0.08, 1.0) if kind == "simclr" else (0.5, 1.0))
    if rng.random() < 0.5:
        x = x[:, ::-1]
    x = x.astype(np.float32) / 255.0
    if kind == "simclr":
        if rng.random() < 0.8:
            x = colour_jitter(x, rng)
        if rng.random() < 0.2:
            x = grayscale(x)
    if rng.random() < 0.5:
        sigma = rng.uniform(0.1, 2.0)
        x = ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="reflect")
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class SslViews:
    """The pipeline's hook (`TrainExample`'s `add_fields`): `ssl_views` uint8 [2, size, size, 3] of an example's
    source image. A module-level dataclass, so grain's worker processes can pickle it."""

    image_size: int
    kind: str = "simclr"

    def __call__(self, example: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        image = example["image"]
        return {"ssl_views": np.stack([ssl_view(image, self.image_size, rng, self.kind) for _ in range(2)])}
