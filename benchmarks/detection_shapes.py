"""Open-vocabulary detection on `shapes` (docs/detection.md): ViLD's variants, GLIP with and without fusion, and CLIP
on crops, at the same backbone.

    python benchmarks/detection_shapes.py [--seeds 0 1] [--out-dir workdirs/detection_shapes]
        [--start-workdirs workdirs/demo workdirs/resnet_shapes/vit_seed1] [--num-examples 200]

Per seed, from that seed's demo CLIP (configs/demo.py; `--start-workdirs`, one per seed), six trainings on boxes of
seen pairs in cluttered training scenes: ViLD-text, ViLD-image, ViLD (w = 0.5) and ViLD-ensemble
(configs/vild_shapes.py; they share one cache of regions and teacher embeddings, made by the first and copied to the
others), GLIP and GLIP without fusion (configs/glip_shapes.py). A run whose workdir holds results.json is read, not
retrained. Then the training-free baseline: the start CLIP classifies the 1x and 1.5x crops of the ViLD run's
proposals (`clip_on_crops`). All are scored by COCOeval on the same `--num-examples` test_novel scenes (3-6 objects,
one held-out pair in each): AP and AP50 on the 40 seen pairs (base) and the 8 held-out ones (novel), and the
class-agnostic AP50 of the boxes alone (how well they are placed, whatever their class). Inference time
per image is measured on those scenes, batch 50, after a first call that compiles. Saves
benchmarks/results/detection_shapes.json (method -> base/novel -> ap, ap50: mean, std, per seed) and a figure of
predicted boxes, docs/detection_shapes.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

from clip_jax.data.classification import class_embeddings
from clip_jax.data.detection import DetectionSet, shapes_detection_set
from clip_jax.data.shapes import ZERO_SHOT_TEMPLATES
from clip_jax.evaluate.detection import Detections, clip_on_crops, detect, detection_ap, top_detections
from clip_jax.evaluate.encoder import Encoder
from clip_jax.files import results_json
from clip_jax.models.boxes import nms
from clip_jax.train.loop import load_trained

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from machine import environment_facts  # noqa: E402
from slip_shapes import training_seconds  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "detection_shapes.json"
FIGURE = REPO / "docs" / "detection_shapes.png"
RUNS = {"vild": "configs/vild_shapes.py", "vild_text": "configs/vild_shapes.py:text",
        "vild_image": "configs/vild_shapes.py:image", "vild_ensemble": "configs/vild_shapes.py:ensemble",
        "glip": "configs/glip_shapes.py", "glip_no_fusion": "configs/glip_shapes.py:no_fusion"}
SHARED_CACHE = {"vild_text": "vild", "vild_image": "vild", "vild_ensemble": "vild", "glip_no_fusion": "glip"}
CACHE = "detection_train.npz"
OBJECTS = (3, 6)
BATCH = 50


def train(run: str, workdir: pathlib.Path, start: pathlib.Path, seed: int, out: pathlib.Path) -> float:
    """Trains one run (unless done); its training time in seconds, from its logged throughput."""
    if (workdir / "results.json").exists():
        return training_seconds(workdir)
    source = SHARED_CACHE.get(run)
    if source is not None and (out / f"{source}_seed{seed}" / CACHE).exists() and not (workdir / CACHE).exists():
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / f"{source}_seed{seed}" / CACHE, workdir / CACHE)
    command = [sys.executable, "-m", "clip_jax", "train", "--config", RUNS[run], "--workdir", str(workdir),
               f"--config.init_from={start}", f"--config.seed={seed}", "--config.log.every_steps=100"]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return training_seconds(workdir)


def timed(fn, *args):
    """(result, seconds) of fn(*args) after one call that compiles."""
    fn(*args)
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def class_agnostic_ap(data: DetectionSet, detections: list[Detections]) -> dict[str, float]:
    """How well the boxes alone are placed: AP of the detections as one class "object" (overlaps across classes
    suppressed at IoU 0.5) against every object's box."""
    objects = DetectionSet(data.images, data.boxes, [np.zeros_like(c) for c in data.classes], ["object"])
    merged = []
    for det in detections:
        keep = nms(det.boxes, det.scores, 0.5)
        merged.append(Detections(det.boxes[keep], det.scores[keep], np.zeros(len(keep), np.int32)))
    return detection_ap(objects, merged, {}, "det_agnostic")


def crops_baseline(vild_encoder: Encoder, start: pathlib.Path, names: list[str]):
    """CLIP on crops as a function of images: the ViLD run's proposals, each cropped and classified by the start
    CLIP (`clip_on_crops`)."""
    clip = load_trained(start)
    encoder = Encoder(clip.model, clip.params, clip.mesh, 256)
    length = clip.config.model.text.context_length
    classes = class_embeddings(lambda t: encoder.texts(clip.tokenizer(t, length)), names, ZERO_SHOT_TEMPLATES)
    scale = float(np.exp(np.asarray(clip.params["logit_scale"])))

    def run(images: np.ndarray):
        boxes, objectness = vild_encoder.predict("propose", images)
        scores = clip_on_crops(encoder.images, images, boxes, objectness, classes, scale)
        return [top_detections(b, s) for b, s in zip(boxes, scores, strict=True)]

    return run


def evaluate_seed(out: pathlib.Path, start: pathlib.Path, seed: int, n: int) -> tuple[dict, dict, dict]:
    """(AP results per method, seconds per image per method, detections for the figure) of one seed's runs."""
    results, seconds, figure = {}, {}, {}
    data = None
    for run in RUNS:
        trained = load_trained(out / f"{run}_seed{seed}")
        if data is None:
            data = shapes_detection_set(trained.config, "test_novel", n, OBJECTS)
        method = trained.method
        encoder = Encoder(trained.model, trained.params, trained.mesh, BATCH)
        length = trained.config.model.text.context_length
        queries = method.detection_queries(lambda t, e=encoder, tr=trained, n=length: e.texts(tr.tokenizer(t, n)),
                                           trained.tokenizer, data.names)
        detections, elapsed = timed(detect, encoder, queries, data.images)
        base = np.flatnonzero(method.base_mask(data.names))
        novel = np.flatnonzero(method.base_mask(data.names) == 0)
        subsets = {"base": base, "novel": novel}
        results[run] = detection_ap(data, detections, subsets, "det") | class_agnostic_ap(data, detections)
        seconds[run] = elapsed / n
        figure[run] = detections[:4]
        if run == "vild":  # the baseline classifies this run's proposals with the start CLIP
            crops, elapsed = timed(crops_baseline(encoder, start, data.names), data.images)
            results["clip_on_crops"] = detection_ap(data, crops, subsets, "det") | class_agnostic_ap(data, crops)
            seconds["clip_on_crops"] = elapsed / n
            figure["clip_on_crops"] = crops[:4]
    figure["truth"] = data
    return results, seconds, figure


def draw_figure(figure: dict, path: pathlib.Path, names: list[str], min_score: float = 0.3) -> None:
    """Four test_novel scenes (rows) x ground truth and each method's boxes scoring >= min_score (columns)."""
    data = figure["truth"]
    columns = ["truth", "clip_on_crops", "vild_text", "vild", "vild_ensemble", "glip"]
    scale, size = 3, data.images.shape[1]
    tile = size * scale
    canvas = Image.new("RGB", (tile * len(columns), tile * 4 + 14), "white")
    draw = ImageDraw.Draw(canvas)
    for c, column in enumerate(columns):
        draw.text((c * tile + 4, 1), column, fill=(0, 0, 0))
        for r in range(4):
            image = Image.fromarray(data.images[r]).resize((tile, tile), Image.NEAREST)
            d = ImageDraw.Draw(image)
            if column == "truth":
                boxes, classes, scores = data.boxes[r], data.classes[r], np.ones(len(data.classes[r]))
            else:
                det = figure[column][r]
                keep = det.scores >= min_score
                boxes, classes, scores = det.boxes[keep], det.classes[keep], det.scores[keep]
            for box, cls, score in zip(boxes * tile, classes, scores, strict=True):
                colour = (0, 160, 0) if column == "truth" else (220, 0, 0)
                d.rectangle(tuple(box), outline=colour, width=2)
                label = names[cls] if column == "truth" else f"{names[cls]} {score:.2f}"
                d.text((box[0] + 2, box[1] + 1), label, fill=colour)
            canvas.paste(image, (c * tile, 14 + r * tile))
    canvas.save(path)


def summarise(per_seed: list[dict]) -> dict:
    out = {}
    for method in per_seed[0]:
        out[method] = {}
        for subset in ("base", "novel"):
            out[method][subset] = {}
            for metric in ("ap", "ap50"):
                values = [r[method][f"det_{subset}_{metric}"] for r in per_seed]
                out[method][subset][metric] = {"mean": float(np.mean(values)), "std": float(np.std(values)),
                                               "per_seed": values}
        values = [r[method]["det_agnostic_ap50"] for r in per_seed]
        out[method]["class_agnostic"] = {"ap50": {"mean": float(np.mean(values)), "per_seed": values}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out-dir", default="workdirs/detection_shapes")
    parser.add_argument("--start-workdirs", nargs="+", default=["workdirs/demo", "workdirs/resnet_shapes/vit_seed1"])
    parser.add_argument("--num-examples", type=int, default=200)
    args = parser.parse_args()
    if len(args.start_workdirs) < len(args.seeds):
        parser.error("give one --start-workdirs per seed")
    out = REPO / args.out_dir
    per_seed, seconds, train_seconds = [], {}, {}
    for seed, start in zip(args.seeds, args.start_workdirs, strict=False):
        start = REPO / start
        for run in RUNS:
            train_seconds.setdefault(run, []).append(train(run, out / f"{run}_seed{seed}", start, seed, out))
        results, times, figure = evaluate_seed(out, start, seed, args.num_examples)
        per_seed.append(results)
        for k, v in times.items():
            seconds.setdefault(k, []).append(v)
        if seed == args.seeds[0]:
            draw_figure(figure, FIGURE, figure["truth"].names)
        print(json.dumps({"seed": seed, **results}, indent=1), flush=True)
    record = {"machine": environment_facts(),
              "date": datetime.date.today().isoformat(), "seeds": args.seeds, "start_workdirs": args.start_workdirs,
              "num_examples": args.num_examples, "objects": OBJECTS,
              "seconds_per_image": {k: {"mean": float(np.mean(v)), "per_seed": v} for k, v in seconds.items()},
              "training_seconds": train_seconds, "results": summarise(per_seed)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(results_json(record))
    for method, subsets in record["results"].items():
        print(f"{method:16s} base AP50 {subsets['base']['ap50']['mean']:.3f}  novel AP50 "
              f"{subsets['novel']['ap50']['mean']:.3f}  novel AP {subsets['novel']['ap']['mean']:.3f}  "
              f"boxes alone AP50 {subsets['class_agnostic']['ap50']['mean']:.3f}  "
              f"{record['seconds_per_image'][method]['mean'] * 1000:.1f} ms/image")


if __name__ == "__main__":
    main()
