"""Self-supervised image views (SLIP): two random augmentations of each training image, made in the grain map
with the example's own generator, so they are deterministic and resume exactly like the rest of the pipeline.

Two sets (`SSL_AUGMENTATIONS`):
- "simclr", the reference's: random resized crop of 8-100% of the area, horizontal flip, colour jitter
  (brightness, contrast, saturation 0.4, hue 0.1; in random order) with probability 0.8, grayscale with
  probability 0.2, Gaussian blur (sigma 0.1-2 px) with probability 0.5. Its features learn to ignore colour.
- "colour": colour-preserving, for tasks where colour is the label (shapes' colour-shape pairs): random resized
  crop of 50-100% (an object survives the crop), flip and blur; no jitter, no grayscale.

The colour operations serve the training images too: `data.colour_jitter` (pipeline.TrainExample, `jitter_image`)
and the grayscale of shape-only captions.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from clip_jax.data.images import random_resized_crop

SSL_AUGMENTATIONS = ("simclr", "colour")
_GRAY = np.array([0.299, 0.587, 0.114], np.float32)


# Where each of R, G, B takes its value on the colour circle in sixths (hue 0 red, 2 green, 4 blue): a channel is
# max - (max - min) * clip(min(k, 4 - k), 0, 1) with k = (its offset + 6 * hue) mod 6, the HSV to RGB conversion.
_CHANNEL_OFFSETS = np.array([5.0, 3.0, 1.0], np.float32)


def shift_hue(x: np.ndarray, shift: float) -> np.ndarray:
    """A float RGB image [..., 3] with every pixel's HSV hue moved by `shift` of the colour circle, its saturation
    and value kept (so its max and min channel). One pass through the hue, without building HSV images: on planes,
    with channel-wise max and min and a floor-based modulo (numpy's reductions over a 3-wide axis and its float `%`
    are each slower than the rest together)."""
    r, g, b = np.ascontiguousarray(np.moveaxis(x, -1, 0), dtype=np.float32)
    high = np.maximum(np.maximum(r, g), b)
    delta = high - np.minimum(np.minimum(r, g), b)
    safe = np.where(delta > 0, delta, np.float32(1.0))  # a gray pixel (delta 0) stays gray whatever its hue
    hue = np.where(high == r, (g - b) / safe, np.where(high == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    k = _CHANNEL_OFFSETS.reshape((3,) + (1,) * hue.ndim) + (hue + np.float32(6.0 * shift))
    k -= 6.0 * np.floor(k * np.float32(1 / 6))
    return np.stack(list(high - delta * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)), -1)


def grayscale(x: np.ndarray) -> np.ndarray:
    return np.repeat((x @ _GRAY)[..., None], 3, axis=-1)


def shuffle_pixels(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image's pixels in a random order: the same colours in the same amounts, and no shape left."""
    height, width, channels = image.shape
    return image.reshape(height * width, channels)[rng.permutation(height * width)].reshape(image.shape)


def colour_jitter(x: np.ndarray, rng: np.random.Generator, brightness: float = 0.4, contrast: float = 0.4,
                  saturation: float = 0.4, hue: float = 0.1) -> np.ndarray:
    """torchvision's ColorJitter on a float image in [0, 1]: the four adjustments in a random order, each by a
    factor drawn from [1 - s, 1 + s] (hue: a shift drawn from [-hue, hue] of the colour circle), the image clipped to
    [0, 1] after each. An adjustment of strength 0 is skipped and draws nothing; a hue of 0 saves the costliest of the
    four."""
    strengths = (brightness, contrast, saturation, hue)
    x = np.array(x, np.float32)  # a copy, adjusted in place: a fraction of the passes and allocations of blends
    for op in rng.permutation(4):
        strength = strengths[op]
        if strength <= 0:
            continue
        if op == 3:
            x = shift_hue(x, rng.uniform(-strength, strength))
        else:
            # Each a blend with a degenerate image: black (brightness), the mean gray level (contrast), the pixel's
            # own gray (saturation): x * f + (1 - f) * degenerate.
            degenerate = (x @ _GRAY).mean() if op == 1 else (x @ _GRAY)[..., None] if op == 2 else 0.0
            factor = rng.uniform(1 - strength, 1 + strength)
            x *= factor
            x += (1 - factor) * degenerate
        np.clip(x, 0.0, 1.0, out=x)
    return x


def jitter_image(image: np.ndarray, rng: np.random.Generator, strengths: tuple[float, ...]) -> np.ndarray:
    """`colour_jitter` of a uint8 RGB image with the (brightness, contrast, saturation, hue) strengths, as uint8."""
    jittered = colour_jitter(np.asarray(image, np.float32) / 255.0, rng, *strengths)
    return np.clip(np.rint(jittered * 255.0), 0, 255).astype(np.uint8)


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
        from scipy import ndimage  # here, not at the top: importing it slows every command's start

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
