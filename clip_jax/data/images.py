"""Image preprocessing on the host, in uint8 (normalisation happens on device, see `CLIP.encode_image`):
decoding any mode to RGB, random resized crop for training, resize + centre crop for evaluation, and robust file
loading."""

from __future__ import annotations

import io
import math
import os
import pathlib
import stat
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from etils import epath
from PIL import Image, UnidentifiedImageError

from clip_jax.files import is_remote, visible_files

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# The most bytes read for one image file (`data convert --max-image-bytes`, `encode --max-image-bytes`,
# `data.max_image_bytes`): far above any real photo (a 50-megapixel JPEG is ~25 MB), low enough that a wrong path
# (a video, a disk image) costs a skipped sample, not the host's memory.
DEFAULT_MAX_IMAGE_BYTES = 64 << 20
# PIL modes of more than 8 bits per pixel: 16-bit (PNG, TIFF), 32-bit integer and float.
_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# Images decoded and held at once where a command or the Python API embeds many (`image_chunks`): 154 MB at 224 px,
# where a million images at once would be 150 GB.
IMAGE_CHUNK = 1024


def scale_to_uint8(array: np.ndarray) -> np.ndarray:
    """uint8 of an image array of more than 8 bits, scaled by its maximum: such images rarely use their full range
    (12-bit scans, medical images), and a plain cast would wrap or clip at 255. Negative values become 0."""
    array = np.clip(np.asarray(array, dtype=np.float64), 0, None)
    return (array / max(float(array.max(initial=0)), 1.0) * 255).astype(np.uint8)


def rgb_image(img: Image.Image) -> Image.Image:
    """A loaded image of any mode (grayscale, palette, RGBA, CMYK, 16-bit, float) as an RGB PIL image; an RGB one is
    returned as it is."""
    if img.mode in _DEEP_MODES:
        img = Image.fromarray(scale_to_uint8(np.asarray(img)))
    return img if img.mode == "RGB" else img.convert("RGB")


def to_rgb(img: Image.Image) -> np.ndarray:
    """RGB uint8 [H, W, 3] of a loaded image of any mode (grayscale, palette, RGBA, CMYK, 16-bit, float)."""
    return np.asarray(rgb_image(img), dtype=np.uint8)


def open_image(data: bytes, min_side: int = 0) -> tuple[Image.Image, str]:
    """`decode_image`, with the image as an RGB PIL image: what the training crop takes without a copy to an array
    and back (decode and crop 1.42-1.46 against 1.55-1.57 ms for a 256-512 px JPEG on the 2-core VM, the same pixels;
    benchmarks/image_decoders.py)."""
    with Image.open(io.BytesIO(data)) as img:
        mode = img.mode
        if min_side and img.format == "JPEG":
            img.draft("RGB", (min_side, min_side))
        img.load()
        return rgb_image(img), mode


def decode_image(data: bytes, min_side: int = 0) -> tuple[np.ndarray, str]:
    """(RGB uint8 [H, W, 3], the file's own mode: "RGB", "L", "CMYK", "I;16", ...) of encoded image bytes. With
    `min_side`, a JPEG is decoded at the smallest of 1/1, 1/2, 1/4, 1/8 scale whose sides both stay >= min_side
    (libjpeg scales in the DCT: a 4000x3000 photo decodes ~5x faster); other formats decode at full size. Raises
    what PIL raises for a bad file (a truncated one too: the whole image is decoded here)."""
    image, mode = open_image(data, min_side)
    return np.asarray(image, dtype=np.uint8), mode


def crop_min_side(image_size: int, augment: bool, crop_scale: Sequence[float]) -> int:
    """The shorter side a decoded image needs so that the training crop is not upsampled: the smallest random
    resized crop (area fraction crop_scale[0] at aspect ratio 3/4) has a side of sqrt(0.75 * scale) times the
    image's."""
    return math.ceil(image_size / math.sqrt(0.75 * crop_scale[0])) if augment else image_size


def center_crop_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(new width, new height, left, top) of CLIP's eval transform of a width x height image: the size the shorter
    side is resized to `size`, and the offset of the centre crop. Exactly torchvision's `Resize(size)` then
    `CenterCrop(size)`, which OpenAI's CLIP and open_clip preprocess with: the longer side truncated
    (int(size * long / short)), the offset rounded half to even; a rounded longer side differs by a pixel on most
    non-square images, and the embeddings by 1e-3."""
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_width, new_height = (size, new_long) if width <= height else (new_long, size)
    return new_width, new_height, int(round((new_width - size) / 2.0)), int(round((new_height - size) / 2.0))


def resize_center_crop(image: np.ndarray | Image.Image, size: int, resample: int = Image.BICUBIC) -> np.ndarray:
    """CLIP's eval transform: resize the shorter side to `size` (bicubic), then crop the centre square
    (`center_crop_geometry`). A label map (uint8 [H, W] of class indices) takes `resample=Image.NEAREST`, which
    invents no label, and then gets exactly the crop of its image of the same size."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    if img.size != (size, size):
        nw, nh, left, top = center_crop_geometry(*img.size, size)
        if (nw, nh) != img.size:
            img = img.resize((nw, nh), resample)
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def letterbox_geometry(width: int, height: int, size: int) -> tuple[int, int]:
    """(new width, new height) of `letterbox`: the longer side resized to `size`, the shorter in proportion (at least
    a pixel)."""
    scale = size / max(width, height)
    return max(1, min(size, round(width * scale))), max(1, min(size, round(height * scale)))


def letterbox(image: Image.Image, size: int, fill: tuple[int, int, int]) -> np.ndarray:
    """The whole image in a `size` square, as detectors see it (ViLD, GLIP): resized so its longer side fits (bicubic),
    at the top left, the rest `fill`. Where the centre crop would leave out the sides of a wide image."""
    new_width, new_height = letterbox_geometry(*image.size, size)
    square = Image.new("RGB", (size, size), fill)
    square.paste(image if image.size == (new_width, new_height) else image.resize((new_width, new_height),
                                                                               Image.BICUBIC))
    return np.asarray(square, dtype=np.uint8)


def random_crop_box(
    height: int, width: int, rng: np.random.Generator, scale: tuple[float, float] = (0.8, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height) of a random area fraction in `scale` with aspect ratio in `ratio`
    (log-uniform) of a height x width image: ten tries, then the central square."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= width and 0 < ch <= height:
            top, left = rng.integers(0, height - ch + 1), rng.integers(0, width - cw + 1)
            return int(left), int(top), cw, ch
    side = min(height, width)
    return (width - side) // 2, (height - side) // 2, side, side


def random_resized_crop(
    image: np.ndarray | Image.Image,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.8, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """Crop a random area fraction in `scale` with aspect ratio in `ratio` (log-uniform), resize to size x size
    (bilinear): uint8 [size, size, 3] of an RGB array or an RGB PIL image, the same pixels from either."""
    if isinstance(image, Image.Image):
        left, top, cw, ch = random_crop_box(image.height, image.width, rng, scale, ratio)
        crop = image.crop((left, top, left + cw, top + ch))
    else:
        left, top, cw, ch = random_crop_box(*image.shape[:2], rng, scale, ratio)
        crop = Image.fromarray(image[top : top + ch, left : left + cw])
    return np.asarray(crop.resize((size, size), Image.BILINEAR), dtype=np.uint8)


class RefusedFile(OSError):
    """A file `read_image_file` does not read: not a regular file, or over the byte cap. `reason` is the skip
    reason `data convert` reports."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # OSError pickles its args only: keep the reason across processes (grain workers)
        return type(self), (self.reason, str(self))


_SPECIAL_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _check_regular(path: epath.PathLike, st: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _SPECIAL_KINDS if test(st.st_mode)), "a special file")
        raise RefusedFile("not_a_regular_file", f"{path} is {kind}, not a regular file")
    if st.st_size > max_bytes:
        raise RefusedFile("file_too_large", _too_large(path, max_bytes, st.st_size))


def _too_large(path: epath.PathLike, max_bytes: int, size: int | None = None) -> str:
    size_text = f"{size} bytes" if size is not None else f"more than {max_bytes} bytes"
    return (f"{path} has {size_text}, over the limit of {max_bytes} bytes for an image file (raise it with "
            "--max-image-bytes or data.max_image_bytes)")


def _open_nonblocking(path: epath.PathLike, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK)


def read_image_file(path: epath.PathLike, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """The bytes of the image file at `path` (local, or remote through etils.epath): the one place image files are
    read. Raises RefusedFile, without reading it, for a path that is not a regular file (a FIFO would block the
    reader forever, a device such as /dev/zero never ends) or a file over `max_bytes`; other OSErrors
    (FileNotFoundError, PermissionError) as the file system raises them."""
    if is_remote(path):  # an object store holds only regular objects: only the size needs a bound
        with epath.Path(path).open("rb") as f:
            data = f.read(max_bytes + 1)
    else:
        # stat first, so that a device is never even opened (opening one may act: a tape rewinds); then check the
        # opened file again, in case the path was replaced in between. O_NONBLOCK: opening a FIFO then does not
        # wait for a writer, and it changes nothing for a regular file.
        _check_regular(path, os.stat(path), max_bytes)
        with open(path, "rb", opener=_open_nonblocking) as f:
            _check_regular(path, os.fstat(f.fileno()), max_bytes)
            data = f.read(max_bytes + 1)  # the file may have grown since the fstat
    if len(data) > max_bytes:
        raise RefusedFile("file_too_large", _too_large(path, max_bytes))
    return data


def bad_image_reason(error: Exception) -> str:
    """The skip reason of an image PIL could not open or decode: `too_large` (beyond PIL's decompression-bomb
    limit), `truncated_image` (an interrupted download) or `undecodable_image` (anything else: PIL raises many
    types on corrupt data)."""
    if isinstance(error, Image.DecompressionBombError):
        return "too_large"
    if isinstance(error, OSError) and "truncated" in str(error).lower():
        return "truncated_image"
    return "undecodable_image"


def decode_error_text(error: Exception) -> str:
    """What went wrong in decoding, in one line for a person: PIL's own text for a file of no known format names
    the in-memory buffer it read (`<_io.BytesIO object at 0x7f...>`), not the file."""
    if isinstance(error, UnidentifiedImageError):
        return "not in any image format PIL recognises"
    return " ".join(f"{type(error).__name__}: {error}".split())


def load_rgb(path: str | pathlib.Path, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> Image.Image:
    """Decodes any PIL-readable file to an RGB PIL image (grayscale, palette, RGBA, CMYK and 16-bit images are
    converted). Raises ValueError naming the file if it cannot be read (missing, not a regular file, over
    `max_bytes`: `read_image_file`) or decoded (a decompression bomb too)."""
    try:
        data = read_image_file(path, max_bytes)
    except RefusedFile as e:  # its message names the path and why
        raise ValueError(str(e)) from None
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e.strerror or e}") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return rgb_image(img)
    except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt data; the caller skips the file
        raise ValueError(f"cannot decode image {path} ({bad_image_reason(e)}): {decode_error_text(e)}") from None


def load_image(path: str | pathlib.Path, size: int, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
               pad: tuple[int, int, int] | None = None) -> np.ndarray:
    """`load_rgb` as uint8 [size, size, 3]: its centre crop, or with a `pad` colour the whole image, `letterbox`ed.
    ValueError naming the file if it cannot be read or decoded."""
    image = load_rgb(path, max_bytes)
    return resize_center_crop(image, size) if pad is None else letterbox(image, size, pad)


def load_images(paths: Sequence[str | pathlib.Path], size: int, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                pad: tuple[int, int, int] | None = None) -> tuple[list[np.ndarray], list[int], list[str]]:
    """`load_image` of each path, an unreadable or undecodable file skipped rather than fatal: (the images, the
    indices of the paths they came from, the messages of the files skipped). Decoded on a thread per core."""
    images, kept, skipped = [], [], []
    with ThreadPoolExecutor(decode_threads()) as pool:
        for i, (image, error) in enumerate(pool.map(lambda p: _try_load(p, size, max_bytes, pad), paths)):
            if error is None:
                images.append(image)
                kept.append(i)
            else:
                skipped.append(error)
    return images, kept, skipped


def image_chunks(paths: Sequence[str | pathlib.Path], size: int, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                 chunk_size: int = IMAGE_CHUNK, pad: tuple[int, int, int] | None = None
                 ) -> Iterator[tuple[np.ndarray | None, list[int], list[str]]]:
    """`load_images` of `chunk_size` paths at a time: (uint8 [n, size, size, 3] or None where none decoded, the
    indices of their paths among all `paths`, the messages of the files skipped), so that a folder of any size is
    encoded in the memory of one chunk."""
    for start in range(0, len(paths), chunk_size):
        images, kept, skipped = load_images(paths[start:start + chunk_size], size, max_bytes, pad)
        yield (np.stack(images) if images else None), [start + i for i in kept], skipped


def _try_load(path: str | pathlib.Path, size: int, max_bytes: int, pad: tuple[int, int, int] | None = None
              ) -> tuple[np.ndarray | None, str | None]:
    try:
        return load_image(path, size, max_bytes, pad), None
    except ValueError as e:
        return None, str(e)


def decode_threads() -> int:
    """Threads that decode in parallel: PIL releases the GIL while it decodes and resizes, so one per usable core, at
    most 16 (each holds a file of up to max_image_bytes and its full-size decode: a 240-core host would hold GBs)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, 16)


def image_chunk_size(batch_size: int) -> int:
    """Images read at a time by a caller that embeds them `batch_size` at a time: about IMAGE_CHUNK, in whole
    batches (a chunk's last batch is not padded)."""
    return batch_size * max(1, IMAGE_CHUNK // batch_size)


def image_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The image files (by suffix) under `folder` at any depth, sorted; hidden entries left out (`visible_files`)."""
    return sorted(pathlib.Path(f) for f in visible_files(folder) if f.suffix.lower() in IMAGE_SUFFIXES)


def list_images(paths: list[str]) -> list[pathlib.Path]:
    """Paths given directly, plus image files (by suffix, sorted) inside given directories. Whether each is a
    readable image is `load_image`'s to say (a FIFO or device is then skipped like a corrupt file)."""
    found: list[pathlib.Path] = []
    for p in map(pathlib.Path, paths):
        if p.is_dir():
            found.extend(image_files(p))
        elif p.exists():
            found.append(p)
        else:
            raise FileNotFoundError(f"image path {p} does not exist")
    return found
