"""Image preprocessing on the host, in uint8 (normalisation happens on device, see `CLIP.encode_image`):
decoding any mode to RGB, random resized crop for training, resize + centre crop for evaluation, and robust file
loading."""

from __future__ import annotations

import io
import math
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# PIL modes of more than 8 bits per pixel: 16-bit (PNG, TIFF), 32-bit integer and float.
_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def scale_to_uint8(array: np.ndarray) -> np.ndarray:
    """uint8 of an image array of more than 8 bits, scaled by its maximum: such images rarely use their full range
    (12-bit scans, medical images), and a plain cast would wrap or clip at 255. Negative values become 0."""
    array = np.clip(np.asarray(array, dtype=np.float64), 0, None)
    return (array / max(float(array.max(initial=0)), 1.0) * 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> np.ndarray:
    """RGB uint8 [H, W, 3] of a loaded image of any mode (grayscale, palette, RGBA, CMYK, 16-bit, float)."""
    if img.mode in _DEEP_MODES:
        img = Image.fromarray(scale_to_uint8(np.asarray(img)))
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, min_side: int = 0) -> tuple[np.ndarray, str]:
    """(RGB uint8 [H, W, 3], the file's own mode: "RGB", "L", "CMYK", "I;16", ...) of encoded image bytes. With
    `min_side`, a JPEG is decoded at the smallest of 1/1, 1/2, 1/4, 1/8 scale whose sides both stay >= min_side
    (libjpeg scales in the DCT: a 4000x3000 photo decodes ~5x faster); other formats decode at full size. Raises
    what PIL raises for a bad file (a truncated one too: the whole image is decoded here)."""
    with Image.open(io.BytesIO(data)) as img:
        mode = img.mode
        if min_side and img.format == "JPEG":
            img.draft("RGB", (min_side, min_side))
        img.load()
        return to_rgb(img), mode


def crop_min_side(image_size: int, augment: bool, crop_scale: Sequence[float]) -> int:
    """The shorter side a decoded image needs so that the training crop is not upsampled: the smallest random
    resized crop (area fraction crop_scale[0] at aspect ratio 3/4) has a side of sqrt(0.75 * scale) times the
    image's."""
    return math.ceil(image_size / math.sqrt(0.75 * crop_scale[0])) if augment else image_size


def resize_center_crop(image: np.ndarray | Image.Image, size: int) -> np.ndarray:
    """CLIP's eval transform: resize the shorter side to `size` (bicubic), then crop the centre square."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def random_resized_crop(
    image: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.8, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """Crop a random area fraction in `scale` with aspect ratio in `ratio` (log-uniform), resize to size x size."""
    h, w = image.shape[:2]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            break
    else:  # fall back to the central square
        cw = ch = min(h, w)
        top, left = (h - ch) // 2, (w - cw) // 2
    crop = Image.fromarray(image[top : top + ch, left : left + cw])
    return np.asarray(crop.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def load_image(path: str | pathlib.Path, size: int) -> np.ndarray:
    """Decodes any PIL-readable file to RGB uint8 [size, size, 3] (grayscale, palette, RGBA, CMYK and 16-bit
    images are converted). Raises ValueError naming the file if it cannot be decoded."""
    try:
        with Image.open(path) as img:
            img.load()
            return resize_center_crop(to_rgb(img), size)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot decode image {path}: {e}") from None


def list_images(paths: list[str]) -> list[pathlib.Path]:
    """Files given directly, plus image files (by suffix, sorted) inside given directories."""
    found: list[pathlib.Path] = []
    for p in map(pathlib.Path, paths):
        if p.is_dir():
            found.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"image path {p} does not exist")
    return found
