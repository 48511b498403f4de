"""Zero-shot segmentation on `shapes` (docs/segmentation.md): LSeg and GroupViT against training-free baselines.

    python benchmarks/segmentation_shapes.py [--seeds 0 1] [--out-dir workdirs/segmentation_shapes]
        [--start-workdirs workdirs/demo workdirs/resnet_shapes/vit_seed1] [--num-examples 300]

Per seed, from that seed's demo CLIP (configs/demo.py; `--start-workdirs`, one per seed), four trainings:
- "lseg": configs/lseg_shapes.py, the dense decoder on the CLIP image tower, masks of seen pairs only;
- "lseg_random": the same with a randomly initialised image tower (how much CLIP's alignment matters);
- "groupvit": configs/groupvit_shapes.py, image-text pairs and per-object phrases, no mask ever;
- "groupvit_no_multi_label": the same without the multi-label loss.
A run whose workdir holds results.json is read, not retrained.

Scored on the same cluttered scenes (3-6 objects; evaluate/segmentation.py, `--num-examples` per split), mIoU over
the background and the 48 colour-shape pairs: `seen` (test_seen scenes: background and seen pairs), `novel` (test_novel
scenes: the held-out pairs, which no mask and, for LSeg, no training label ever named) and `novel_scenes` (test_novel,
every class). GroupViT is scored with soft assignments (the reference's evaluation) and hard ones; its background
threshold, and the baselines', is chosen on `val`. Baselines, from the start CLIP with no training: "dense_clip" (its
patch tokens through the class token's head, background by threshold, and "dense_clip_label" with a background
prompt), and "image_label" (every pixel that is not the flat background colour painted with the image's zero-shot
class: a baseline only shapes' flat backgrounds allow, kept to keep the claims honest). Saves
benchmarks/results/segmentation_shapes.json (method -> split -> miou mean, std, per seed) and a figure of test_novel
scenes, docs/segmentation_shapes.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image, ImageDraw

from clip_jax.data.classification import class_embeddings
from clip_jax.data.pipeline import get_source
from clip_jax.data.shapes import ZERO_SHOT_TEMPLATES
from clip_jax.evaluate.encoder import Encoder
from clip_jax.evaluate.segmentation import (
    ShapesSegmentationEval,
    class_iou,
    confusion_matrix,
    mean_iou,
    overlay,
    shapes_predictions,
    shapes_segmentation_data,
)
from clip_jax.evaluate.suite import eval_defaults, evaluate
from clip_jax.files import results_json
from clip_jax.methods import get_method
from clip_jax.train.loop import load_trained

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from machine import environment_facts  # noqa: E402
from slip_shapes import training_seconds  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "segmentation_shapes.json"
FIGURE = REPO / "docs" / "segmentation_shapes.png"
RUNS = {"groupvit": "configs/groupvit_shapes.py",
        "groupvit_no_multi_label": "configs/groupvit_shapes.py:no_multi_label",
        "lseg": "configs/lseg_shapes.py", "lseg_random": "configs/lseg_shapes.py:random",
        "groupvit_long": "configs/groupvit_shapes.py:long"}
DEFAULT_RUNS = ("groupvit", "groupvit_no_multi_label", "lseg", "lseg_random")
SPLITS = {"seen": "seg_seen_miou", "novel": "seg_novel_miou", "novel_scenes": "seg_novel_scenes_miou"}
OBJECTS = (3, 6)


def train(run: str, workdir: pathlib.Path, start: pathlib.Path, seed: int) -> float:
    """Trains one run (unless done); its training time in seconds, from its logged throughput."""
    if (workdir / "results.json").exists():
        return training_seconds(workdir)
    command = [sys.executable, "-m", "clip_jax", "train", "--config", RUNS[run], "--workdir", str(workdir),
               f"--config.init_from={start}", f"--config.seed={seed}"]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return training_seconds(workdir)


def segmentation(trained, background: str, n: int, **method_fields) -> dict[str, float]:
    """The `shapes_segmentation` evaluation of a trained workdir, with method fields changed for evaluation only
    (GroupViT's eval_hard)."""
    config = trained.config
    method, model = trained.method, trained.model
    if method_fields:
        config.method.update(method_fields)
        method = get_method(config)
        model = method.model()
    config.evals = {"seg": {**eval_defaults("shapes_segmentation"), "background": background, "num_examples": n,
                            "min_objects": OBJECTS[0], "max_objects": OBJECTS[1]}}
    return evaluate(config, model, trained.params, trained.mesh, trained.tokenizer, method=method)


def image_label_baseline(trained, n: int) -> dict[str, float]:
    """Foreground = every pixel that differs from the image's most common colour (the flat background); painted with
    the image's zero-shot class among the 48 pairs (the CLIP's prompt ensemble)."""
    config = trained.config
    encoder = Encoder(trained.model, trained.params, trained.mesh, 250)
    texts = lambda t: encoder.texts(trained.tokenizer(t, config.model.text.context_length))  # noqa: E731
    source = get_source(config, "test_novel")
    classes = class_embeddings(texts, source.class_names(), ZERO_SHOT_TEMPLATES)
    seen = [0] + [c + 1 for c in source.seen_classes()]
    novel = [c + 1 for c in source.held_out_classes()]
    out = {}
    for split in ("test_seen", "test_novel"):
        images, target = shapes_segmentation_data(config.to_json(), split, n, OBJECTS)
        label = np.argmax(encoder.images(images) @ classes.T, axis=1) + 1
        flat = images.reshape(len(images), -1, 3)
        pred = np.zeros(target.shape, np.int64)
        for i, pixels in enumerate(flat):
            colours, counts = np.unique(pixels, axis=0, return_counts=True)
            foreground = (pixels != colours[np.argmax(counts)]).any(axis=1).reshape(target.shape[1:])
            pred[i][foreground] = label[i]
        confusion = confusion_matrix(target, pred, len(classes) + 1)
        if split == "test_seen":
            out["seg_seen_miou"] = mean_iou(confusion, seen)
        else:
            out["seg_novel_miou"] = mean_iou(confusion, novel)
            out["seg_novel_scenes_miou"] = mean_iou(confusion)
            out["seg_iou/background"] = float(class_iou(confusion)[0])
    return out


def grouping_quality(trained, n: int, **method_fields) -> dict[str, float]:
    """How well GroupViT's final segments separate the objects, whatever they are named: for each object of n
    test_novel scenes, the best IoU of its pixels with one segment's (each pixel in its most likely segment), averaged
    over objects; and the segments used per image."""
    from clip_jax.methods.groupvit import GroupViTCLIP
    from clip_jax.models.grouping import assignment_to_pixels

    config = trained.config
    config.method.update(method_fields)
    model = get_method(config).model()
    config.data.min_objects, config.data.max_objects = OBJECTS
    source = get_source(config, "test_novel")
    images = np.stack([source[i]["image"] for i in range(n)])
    _, _, assignment = model.apply({"params": trained.params}, images, method=GroupViTCLIP.segments)
    v = model.config.vision
    owner = np.asarray(assignment_to_pixels(assignment, v.grid, v.image_size)).argmax(1)
    best, used = [], []
    for i in range(n):
        _, instances = source.masks(i)
        used.append(len(np.unique(owner[i])))
        for k in range(1, instances.max() + 1):
            obj = instances == k
            best.append(max(((owner[i] == g) & obj).sum() / ((owner[i] == g) | obj).sum() for g in np.unique(owner[i])))
    return {"object_best_segment_iou": float(np.mean(best)), "segments_per_image": float(np.mean(used))}


def figure(panels: dict[str, tuple[np.ndarray, np.ndarray]], images: np.ndarray, target: np.ndarray,
           path: pathlib.Path, scale: int = 2) -> None:
    """Rows = scenes; columns = the image, the truth, then each method's prediction, overlaid; titled."""
    columns = [("image", images), ("truth", [overlay(im, t) for im, t in zip(images, target, strict=True)])]
    columns += [(name, [overlay(im, p) for im, p in zip(images, pred, strict=True)]) for name, pred in panels.items()]
    size, title = images.shape[1] * scale, 14
    canvas = Image.new("RGB", (size * len(columns), title + size * len(images)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (name, tiles) in enumerate(columns):
        draw.text((c * size + 3, 1), name, fill="black")
        for r, tile in enumerate(tiles):
            canvas.paste(Image.fromarray(np.asarray(tile)).resize((size, size), Image.NEAREST),
                         (c * size, title + r * size))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def predictions(trained, background: str, n: int) -> np.ndarray:
    """A trained workdir's class maps of the first n test_novel scenes, as its evaluation makes them (the threshold
    chosen on n val scenes)."""
    config = trained.config
    encoder = Encoder(trained.model, trained.params, trained.mesh, 100)
    texts = lambda t: encoder.texts(trained.tokenizer(t, config.model.text.context_length))  # noqa: E731
    entry = ShapesSegmentationEval(background=background, min_objects=OBJECTS[0], max_objects=OBJECTS[1])
    return shapes_predictions(texts, encoder, config, entry, n)[1]["test_novel"][2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--start-workdirs", nargs="+", default=["workdirs/demo", "workdirs/resnet_shapes/vit_seed1"])
    parser.add_argument("--out-dir", default="workdirs/segmentation_shapes")
    parser.add_argument("--num-examples", type=int, default=300)
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), choices=list(RUNS),
                        help="groupvit_long (4x the steps) is a budget check, run on its own: --runs groupvit_long "
                        "--seeds 0; its results are merged into the JSON")
    args = parser.parse_args()
    if len(args.start_workdirs) < len(args.seeds):
        parser.error("give one --start-workdirs entry per seed")
    out_dir = REPO / args.out_dir
    per_seed: dict[str, list[dict[str, float]]] = {}
    seconds: dict[str, list[float]] = {}

    def record(name: str, results: dict[str, float]) -> None:
        per_seed.setdefault(name, []).append(results)
        print(f"{name:<28}" + "  ".join(f"{s} {results[k]:.3f}" for s, k in SPLITS.items()), flush=True)

    for seed, start in zip(args.seeds, args.start_workdirs, strict=False):
        start = REPO / start
        print(f"--- seed {seed}, from {start}", flush=True)
        for run in args.runs:
            seconds.setdefault(run, []).append(train(run, out_dir / f"{run}_seed{seed}", start, seed))
        clip = load_trained(start)
        record("dense_clip", segmentation(clip, "threshold", args.num_examples))
        record("dense_clip_label", segmentation(load_trained(start), "label", args.num_examples))
        record("image_label", image_label_baseline(load_trained(start), args.num_examples))
        for run in args.runs:
            workdir = out_dir / f"{run}_seed{seed}"
            if run.startswith("lseg"):
                record(run, segmentation(load_trained(workdir), "label", args.num_examples))
            else:
                record(run, segmentation(load_trained(workdir), "threshold", args.num_examples)
                       | grouping_quality(load_trained(workdir), 100))
                record(f"{run}_hard", segmentation(load_trained(workdir), "threshold", args.num_examples,
                                                   eval_hard=True) | grouping_quality(load_trained(workdir), 100,
                                                                                      eval_hard=True))

    table = {}
    for name, runs in per_seed.items():
        table[name] = {split: {"miou_mean": float(np.mean([r[k] for r in runs])),
                               "miou_std": float(np.std([r[k] for r in runs])),
                               "per_seed": [r[k] for r in runs]} for split, k in SPLITS.items()}
        table[name]["novel_class_iou"] = [{k.removeprefix("seg_iou/"): v for k, v in r.items()
                                           if k.startswith("seg_iou/")} for r in runs]
        if "seg_threshold" in runs[0]:
            table[name]["threshold"] = [r["seg_threshold"] for r in runs]
        for key in ("object_best_segment_iou", "segments_per_image"):
            if key in runs[0]:
                table[name][key] = {"mean": float(np.mean([r[key] for r in runs])), "per_seed": [r[key] for r in runs]}
    print("\nmethod                        seen            novel           novel scenes")
    for name, row in table.items():
        print(f"{name:<28}" + "  ".join(f"{row[s]['miou_mean']:.3f} +- {row[s]['miou_std']:.3f}" for s in SPLITS))

    # The figure (a full invocation): the first seed's models on test_novel scenes.
    if set(args.runs) == set(DEFAULT_RUNS):
        seed = args.seeds[0]
        clip_start = REPO / args.start_workdirs[0]
        images, target = shapes_segmentation_data(load_trained(clip_start).config.to_json(), "test_novel", 6, OBJECTS)
        panels = {"dense CLIP": predictions(load_trained(clip_start), "threshold", args.num_examples)[:6]}
        for run, background in (("lseg", "label"), ("groupvit", "threshold"), ("groupvit_no_multi_label", "threshold")):
            if run in args.runs:
                panels[run] = predictions(load_trained(out_dir / f"{run}_seed{seed}"), background,
                                          args.num_examples)[:6]
        figure(panels, images, target, FIGURE)

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    run = {"machine": environment_facts(),
           "date": datetime.date.today().isoformat(), "seeds": args.seeds, "start_workdirs": args.start_workdirs,
           "num_examples": args.num_examples, "objects": OBJECTS, "training_seconds": seconds}
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"results": {}}
    if set(args.runs) == set(DEFAULT_RUNS):  # the table anew; a budget check's entries (groupvit_long) are kept
        kept = {k: v for k, v in saved["results"].items() if k.startswith("groupvit_long")}
        saved = {**run, "results": {**table, **kept},
                 **({"extra_invocations": saved["extra_invocations"]} if kept else {})}
    else:  # a partial invocation (the budget check): its runs merged into the saved table, under their own record
        saved["results"].update({k: v for k, v in table.items() if k.startswith(tuple(args.runs))})
        saved.setdefault("extra_invocations", []).append({**run, "runs": args.runs})
    RESULTS.write_text(results_json(saved))
    print(f"wrote {RESULTS} and {FIGURE}")


if __name__ == "__main__":
    main()
