"""Image preprocessing on the host, in uint8 (normalisation happens on device, see `CLIP.encode_image`):
random resized crop for training, resize + centre crop for evaluation, and robust file loading."""

from __future__ import annotations

import math
import pathlib

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


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
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float64)
                img = Image.fromarray((arr / max(arr.max(), 1) * 255).astype(np.uint8))
            img = img.convert("RGB")
            return resize_center_crop(img, size)
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
