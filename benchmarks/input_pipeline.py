"""Input pipeline throughput per CPU core on our ArrayRecord shards: read + JPEG decode + random resized crop to
224 + tokenize, and how many host cores one H100 training B/16 would need.

    python benchmarks/input_pipeline.py [--n 2000] [--seconds 12] [--colour-jitter 0.4 0.4 0.4 0.1]

1. Generates N JPEG images (quality 90) of 256-512 px per side, random aspect: `shapes` scenes rendered at that
   size plus Gaussian noise (sigma 6), which brings file size and decode time to those of photos (~40-60 KB,
   ~1.5-2 ms at 512 px), with web-like alt-text captions (benchmarks/tokenizer.py's generator), written as shards.
2. "one core": the per-example work in one process with no threads (records read in shuffled order, decoded,
   cropped; captions tokenized in batches of 256 to 77 tokens, as pipeline.Tokenize does), reported per
   wall-second and per CPU-second of the process: the latter is the per-core figure, robust to other jobs.
3. "grain": the training pipeline itself (pipeline.train_dataset, data.source=records, batch 256) with
   data.workers = 1 and 2 processes, by wall clock (on a shared 2-core machine these include contention).
`--colour-jitter B C S H` adds data.colour_jitter with those strengths (on 80% of the images, data.colour_jitter_prob's
default) to both, after the crop as in the pipeline, and writes input_pipeline_<host>_jitter.json.
Cores per H100 = H100 samples/s at 55% MFU of 989 TFLOP/s (train_flops_per_sample of B/16 at 224 px, 77 tokens)
divided by one core's samples/s. Writes benchmarks/results/input_pipeline_<host>.json.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import io
import json
import os
import pathlib
import socket
import sys
import tempfile
import time

import grain
import numpy as np
from absl import flags
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import environment_facts  # noqa: E402
from result_files import checked_out_file, count, positive  # noqa: E402

from clip_jax.config import default_config  # noqa: E402
from clip_jax.data import records  # noqa: E402
from clip_jax.data.augment import jitter_image  # noqa: E402
from clip_jax.data.images import crop_min_side, open_image, random_resized_crop  # noqa: E402
from clip_jax.data.pipeline import train_dataset  # noqa: E402
from clip_jax.data.shapes import ShapesConfig, ShapesDataset  # noqa: E402
from clip_jax.data.tokenizer import ClipTokenizer  # noqa: E402
from clip_jax.files import results_json  # noqa: E402
from clip_jax.models.clip import CLIPConfig  # noqa: E402
from clip_jax.models.flops import PEAK_FLOPS, train_flops_per_sample  # noqa: E402
from clip_jax.models.presets import model_preset  # noqa: E402

IMAGE_SIZE, CONTEXT, BATCH, MFU = 224, 77, 256, 0.55


def load_caption_generator():
    spec = importlib.util.spec_from_file_location("tokenizer_benchmark", ROOT / "benchmarks" / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_captions


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """N photo-like JPEGs (quality 90) of 256-512 px per side, some landscape: `shapes` scenes rendered at that
    size plus Gaussian noise (sigma 6), which brings file size and decode time to those of photos."""
    rng = np.random.default_rng(seed)
    renderers = {s: ShapesDataset(ShapesConfig(image_size=s, min_objects=2, max_objects=6, seed=seed), "train")
                 for s in (256, 320, 384, 448, 512)}
    # A few noise fields reused at random (drawing fresh noise per image would double the generation time)
    noise = [rng.normal(0, 6, (512, 512, 3)).round().astype(np.int16) for _ in range(8)]
    jpegs = []
    for i in range(n):
        side = int(rng.choice(list(renderers)))
        h = side if rng.random() < 0.5 else int(side * rng.uniform(0.6, 1.0))  # some landscape images
        image = renderers[side][i]["image"][:h].astype(np.int16) + noise[i % 8][:h, :side]
        out = io.BytesIO()
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
        jpegs.append(out.getvalue())
    return jpegs


def make_shards(directory: pathlib.Path, n: int, shards: int, seed: int = 0) -> dict:
    captions = load_caption_generator()(n, non_ascii=0.1, ampersand=0.03, seed=seed)
    jpegs = make_jpegs(n, seed)
    per_shard = -(-n // shards)
    for s in range(shards):
        with records.ShardWriter(directory / records.shard_name("bench", s, shards)) as writer:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                writer.write(records.encode_record(jpegs[i], captions[i], key=str(i)))
    pixels = [np.prod(Image.open(io.BytesIO(jpeg)).size) for jpeg in jpegs]
    return {"images": n, "shards": shards, "mean_kb": round(float(np.mean([len(j) for j in jpegs])) / 1024, 1),
            "mean_pixels": int(np.mean(pixels)), "sides": "256-512 px, quality 90"}


def one_core(paths: list[str], tokenizer: ClipTokenizer, seconds: float, jitter: tuple[float, ...] | None) -> dict:
    """Per-example work in this process, no threads: what one core sustains."""
    jitter_prob = default_config().data.colour_jitter_prob
    source = records.RecordSource(paths)
    min_side = crop_min_side(IMAGE_SIZE, True, (0.8, 1.0))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(source))
    done, captions, stages = 0, [], {"read": 0.0, "decode": 0.0, "crop": 0.0, "colour_jitter": 0.0, "tokenize": 0.0}
    wall, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
        for index in order:
            t0 = time.perf_counter()
            item = source[int(index)]
            t1 = time.perf_counter()
            image = open_image(item["image_bytes"], min_side)[0]  # as pipeline.DecodeExample does
            t2 = time.perf_counter()
            crop = random_resized_crop(image, IMAGE_SIZE, rng, (0.8, 1.0))
            t3 = time.perf_counter()
            if jitter is not None and rng.random() < jitter_prob:  # as pipeline.TrainExample does
                jitter_image(crop, rng, jitter)
            t4 = time.perf_counter()
            captions.append(item["long_caption"])
            if len(captions) == BATCH:
                tokenizer(captions, CONTEXT)
                captions = []
            t5 = time.perf_counter()
            for key, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                stages[key] += dt
            done += 1
            if done % BATCH == 0 and time.perf_counter() - wall >= seconds:
                break
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"samples": done, "per_wall_s": round(done / wall, 1), "per_cpu_s": round(done / cpu, 1),
            "ms_per_sample": {k: round(v / done * 1e3, 3) for k, v in stages.items()}}


def grain_rate(shard_dir: pathlib.Path, tokenizer: ClipTokenizer, workers: int, seconds: float,
               jitter: tuple[float, ...] | None) -> dict:
    config = default_config()
    config.data.source, config.data.path, config.data.workers = "records", str(shard_dir), workers
    if jitter is not None:
        config.data.colour_jitter = jitter
    config.batch_size = BATCH
    iterator = iter(train_dataset(config, tokenizer))
    next(iterator)  # start-up (worker processes, first reads) is not throughput
    start, batches = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        next(iterator)
        batches += 1
    elapsed = time.perf_counter() - start
    iterator.close()  # stops the worker processes before the next measurement
    return {"workers": workers, "batches": batches, "samples_per_s": round(batches * BATCH / elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=count, default=2000, help="images to generate")
    parser.add_argument("--shards", type=count, default=4)
    parser.add_argument("--seconds", type=positive, default=12.0, help="per measurement")
    parser.add_argument("--colour-jitter", type=float, nargs=4, metavar=("B", "C", "S", "H"),
                        help="data.colour_jitter strengths: brightness, contrast, saturation, hue")
    parser.add_argument("--out", help="the JSON file, or a folder for the default name "
                        "(default: benchmarks/results/input_pipeline_<host>[_jitter].json; never over an earlier one)")
    args = parser.parse_args()
    suffix = "" if args.colour_jitter is None else "_jitter"
    out = checked_out_file(args.out, ROOT / "benchmarks" / "results" /
                           f"input_pipeline_{socket.gethostname()}{suffix}.json")
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    vocab = ClipTokenizer.find_openai_vocab()
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = pathlib.Path(tmp)
        t0 = time.time()
        data = make_shards(shard_dir, args.n, args.shards)
        data["generation_s"] = round(time.time() - t0, 1)
        paths = records.list_shards(str(shard_dir))
        if vocab is not None:
            tokenizer = ClipTokenizer.from_openai_vocab(vocab)
        else:
            tokenizer = ClipTokenizer.train([records.decode_record(r)["caption"] for r in
                                             grain.sources.ArrayRecordDataSource(paths)], 8192)
        load_before = os.getloadavg()
        jitter = None if args.colour_jitter is None else tuple(args.colour_jitter)
        core = one_core(paths, tokenizer, args.seconds, jitter)
        pipelines = [grain_rate(shard_dir, tokenizer, w, args.seconds, jitter) for w in (1, 2)]
        load_after = os.getloadavg()
    flops = train_flops_per_sample(CLIPConfig.from_dict(model_preset("B/16")), CONTEXT)
    h100 = PEAK_FLOPS["NVIDIA H100"] * MFU / flops
    report = {
        "benchmark": "input_pipeline",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": environment_facts(),
        "args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
        "data": data,
        "tokenizer": tokenizer.name,
        "load_average_before_after": [load_before, load_after],
        "one_core": core,
        "grain_pipeline": pipelines,
        "h100_b16": {
            "train_gflops_per_sample": round(flops / 1e9, 2), "peak_tflops": PEAK_FLOPS["NVIDIA H100"] / 1e12,
            "mfu": MFU, "samples_per_s": round(h100), "cores_needed": round(h100 / core["per_cpu_s"], 1),
        },
        "units": "samples/s; one_core: per wall-second and per CPU-second of one process without threads",
    }
    out.write_text(results_json(report))
    print(json.dumps({k: report[k] for k in ("data", "one_core", "grain_pipeline", "h100_b16")}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
