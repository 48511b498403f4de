"""Decode + random resized crop to 224 by other routes than the training pipeline's, against it: time per image
and how far each one's pixels are from the pipeline's.

    python benchmarks/image_decoders.py [--n 300] [--passes 5]
    pip install simplejpeg pyvips pyvips-binary   # optional: the routes through them run only where installed

On benchmarks/input_pipeline.py's generated JPEGs (256-512 px), each image's crop box drawn once
(`images.random_crop_box`, from a generator seeded per image) and cut by every route:
- `pipeline`: `images.random_resized_crop` of `images.open_image`'s PIL image (at reduced JPEG scale where the
  smallest crop allows): what training does;
- `arrays`: the same of `images.decode_image`'s uint8 array: what training did before 2026-12-05;
- `pil_box`: PIL throughout, the crop as the resize's `box` (whose filter then reads the pixels beside the box);
- `simplejpeg`: libjpeg-turbo's decode through simplejpeg, then `pil_box`'s resize;
- `simplejpeg_scaled`: the same at the smallest of libjpeg-turbo's M/8 DCT scales that keeps the crop at 224 or more;
- `pyvips`: libvips' decode, crop and linear resize.
Time: CPU time of this process (libvips' threads included), best of `passes` passes, the routes taking turns.
Prints and saves JSON (`--out`).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import socket
import sys
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from input_pipeline import IMAGE_SIZE, make_jpegs  # noqa: E402
from machine import environment_facts  # noqa: E402
from result_files import checked_out_file, count  # noqa: E402

from clip_jax.data.images import (  # noqa: E402
    crop_min_side,
    decode_image,
    open_image,
    random_crop_box,
    random_resized_crop,
)
from clip_jax.files import results_json  # noqa: E402

MIN_SIDE = crop_min_side(IMAGE_SIZE, True, (0.8, 1.0))
SCALE = (0.8, 1.0)  # input_pipeline.py's crop scale


def crop_rng(seed: int) -> np.random.Generator:
    """Image `seed`'s generator: every route draws that image's crop box from a fresh one, so all cut the same box."""
    return np.random.default_rng([1, seed])


def crop_box(height: int, width: int, seed: int) -> tuple[int, int, int, int]:
    """The box (left, top, width, height) that `random_resized_crop` cuts from image `seed` of that size."""
    return random_crop_box(height, width, crop_rng(seed), SCALE)


def pipeline(data: bytes, seed: int) -> np.ndarray:
    return random_resized_crop(open_image(data, MIN_SIDE)[0], IMAGE_SIZE, crop_rng(seed), SCALE)


def arrays(data: bytes, seed: int) -> np.ndarray:
    return random_resized_crop(decode_image(data, MIN_SIDE)[0], IMAGE_SIZE, crop_rng(seed), SCALE)


def resize_box(image: Image.Image, box: tuple[int, int, int, int], scale: tuple[float, float] = (1.0, 1.0)
               ) -> np.ndarray:
    left, top, cw, ch = box
    sx, sy = scale
    return np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR,
                                   box=(left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)))


def pil_box(data: bytes, seed: int) -> np.ndarray:
    image = open_image(data, MIN_SIDE)[0]  # full size for these images: their sides are below 2 x MIN_SIDE
    return resize_box(image, crop_box(image.height, image.width, seed))


def simplejpeg_route(scaled: bool) -> Callable[[bytes, int], np.ndarray]:
    import simplejpeg

    def route(data: bytes, seed: int) -> np.ndarray:
        height, width = simplejpeg.decode_jpeg_header(data)[:2]
        box = crop_box(height, width, seed)
        # the smallest scale at which the crop keeps IMAGE_SIZE pixels a side
        need = {"min_height": int(np.ceil(IMAGE_SIZE * height / box[3])),
                "min_width": int(np.ceil(IMAGE_SIZE * width / box[2]))}
        image = simplejpeg.decode_jpeg(data, colorspace="RGB", **(need if scaled else {}))
        return resize_box(Image.fromarray(image), box, (image.shape[1] / width, image.shape[0] / height))

    return route


def pyvips_route(data: bytes, seed: int) -> np.ndarray:
    import pyvips

    image = pyvips.Image.new_from_buffer(data, "")
    left, top, cw, ch = crop_box(image.height, image.width, seed)
    image = image.crop(left, top, cw, ch).resize(IMAGE_SIZE / cw, vscale=IMAGE_SIZE / ch, kernel="linear")
    return np.ndarray(buffer=image.write_to_memory(), dtype=np.uint8, shape=(image.height, image.width, image.bands))


def routes() -> dict[str, Callable[[bytes, int], np.ndarray]]:
    found = {"pipeline": pipeline, "arrays": arrays, "pil_box": pil_box}
    if importlib.util.find_spec("simplejpeg"):
        found |= {"simplejpeg": simplejpeg_route(False), "simplejpeg_scaled": simplejpeg_route(True)}
    if importlib.util.find_spec("pyvips"):
        found["pyvips"] = pyvips_route
    return found


OPTIONAL_DECODERS = ("simplejpeg", "pyvips")  # routes timed only where installed


def version(package: str) -> str | None:
    """The installed version of `package`, None where it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=count, default=300, help="images")
    parser.add_argument("--passes", type=count, default=5)
    parser.add_argument("--out", help="the JSON file (default: benchmarks/results/image_decoders_<host>.json)")
    args = parser.parse_args()
    out = checked_out_file(args.out, ROOT / "benchmarks" / "results" / f"image_decoders_{socket.gethostname()}.json")

    load_before = os.getloadavg()
    jpegs = make_jpegs(args.n)
    reference = [pipeline(j, i) for i, j in enumerate(jpegs)]
    found = routes()
    results = {}
    for name, route in found.items():
        diff = np.concatenate([np.abs(route(j, i).astype(np.int16) - reference[i]).ravel()
                               for i, j in enumerate(jpegs)])
        results[name] = {"mean_abs_difference": round(float(diff.mean()), 4), "max_difference": int(diff.max()),
                         "fraction_off_by_more_than_2": round(float((diff > 2).mean()), 5), "ms_per_image": []}
    for _ in range(args.passes):
        for name, route in found.items():
            cpu = time.process_time()
            for i, j in enumerate(jpegs):
                route(j, i)
            results[name]["ms_per_image"].append(round((time.process_time() - cpu) / args.n * 1e3, 3))
    for r in results.values():
        r["best_ms_per_image"] = min(r["ms_per_image"])

    # the optional decoders absent here: their routes are missing from `routes`, not slower
    absent = [name for name in OPTIONAL_DECODERS if name not in found]
    report = {"benchmark": "image_decoders", "date": datetime.date.today().isoformat(), "images": args.n,
              "passes": args.passes, "image_size": IMAGE_SIZE, "machine": environment_facts(),
              "load_average_before_after": [load_before, os.getloadavg()],
              "versions": {name: version(name) for name in ("numpy", "pillow", *OPTIONAL_DECODERS)},
              "absent_optional_decoders": absent, "routes": results}
    print(json.dumps(results, indent=1))
    if absent:
        print(f"not timed: {', '.join(absent)} (not installed)")
    out.write_text(results_json(report))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
