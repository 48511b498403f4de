"""Zero-shot top-1 of a trained `shapes` model in each rendering domain (clip_jax/data/shapes.py), used to
calibrate DOMAINS["shifted"]: a downstream domain for few-shot methods where zero-shot is far from perfect.

    python benchmarks/shapes_domain.py [--workdir workdirs/demo] [--n 1000] [--registered-only]

Measures top-1 on the first n `test_seen` images among the seen classes and on the first n `test_held_out` images
among the held-out classes, for the registered domains (DOMAINS) and, unless --registered-only, for the candidate
domains below. Every domain renders the same scenes (same seed, split and index), so the numbers differ by the
pixels alone. Prints a table and saves benchmarks/results/shapes_domain.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # result_files.py beside it
from machine import environment_facts  # noqa: E402
from result_files import checked_out_file  # noqa: E402

from clip_jax.data.classification import class_embeddings  # noqa: E402
from clip_jax.data.shapes import (  # noqa: E402
    DOMAINS,
    ZERO_SHOT_TEMPLATES,
    ShapesConfig,
    ShapesDataset,
    ShapesDomain,
    class_index,
    class_names,
)
from clip_jax.evaluate.encoder import Encoder  # noqa: E402
from clip_jax.evaluate.zero_shot import zero_shot_accuracy  # noqa: E402
from clip_jax.files import results_json
from clip_jax.train.loop import load_trained  # noqa: E402

SHIFTED = DOMAINS["shifted"]
# Around the registered "shifted" domain: each of its changes alone (on its own each barely moves a clean-trained
# model), the domain without each change (what every change contributes), and a milder and a harsher version
# (how steeply accuracy falls near the calibrated point).
CANDIDATES: dict[str, ShapesDomain] = {
    f"noise {SHIFTED.noise_std:g}": ShapesDomain(noise_std=SHIFTED.noise_std),
    f"scale {SHIFTED.render_scale:g}": ShapesDomain(render_scale=SHIFTED.render_scale),
    f"contrast {SHIFTED.contrast:g}": ShapesDomain(contrast=SHIFTED.contrast),
    "unseen backgrounds": ShapesDomain(backgrounds=SHIFTED.backgrounds),
    "shifted, no noise": dataclasses.replace(SHIFTED, noise_std=0.0),
    "shifted, no blur": dataclasses.replace(SHIFTED, render_scale=1.0),
    "shifted, full contrast": dataclasses.replace(SHIFTED, contrast=1.0),
    "shifted, seen backgrounds": dataclasses.replace(SHIFTED, backgrounds=()),
    "milder: noise 25, contrast 0.7": dataclasses.replace(SHIFTED, noise_std=25.0, contrast=0.7),
    "harsher: noise 40": dataclasses.replace(SHIFTED, noise_std=40.0),
}


def render(dataset: ShapesDataset, n: int, domain: ShapesDomain) -> tuple[np.ndarray, float]:
    """The first n images of `dataset` in `domain`, and the rendering time per image in milliseconds."""
    start = time.perf_counter()
    images = np.stack([dataset.image(i, domain) for i in range(n)])
    return images, (time.perf_counter() - start) / n * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="workdirs/demo")
    parser.add_argument("--n", type=int, default=1000, help="images per split")
    parser.add_argument("--registered-only", action="store_true", help="only the domains in DOMAINS")
    parser.add_argument("--out", help="the JSON file, or a folder for the default name (default: "
                        "benchmarks/results/shapes_domain.json, regenerated in place)")
    args = parser.parse_args()
    # the committed result, regenerated in place on purpose (a file named by --out kept); checked before the renders
    # and evaluations
    out = checked_out_file(args.out, pathlib.Path(__file__).parent / "results" / "shapes_domain.json",
                           replace=args.out is None)

    try:
        trained = load_trained(args.workdir)
    except FileNotFoundError as e:  # (the demo's workdir, its default, is not there on a fresh checkout)
        sys.exit(f"--workdir: {e}")
    encoder = Encoder(trained.model, trained.params, trained.mesh, 250)
    context = trained.config.model.text.context_length
    class_embeds = class_embeddings(lambda texts: encoder.texts(trained.tokenizer(texts, context)), class_names(),
                                    ZERO_SHOT_TEMPLATES)
    # Fixed benchmark scenes (the demo's 1-3 objects, seed 0) at the model's resolution; the domain is passed per
    # render, so candidates need no entry in DOMAINS.
    config = ShapesConfig(image_size=trained.config.model.vision.image_size, min_objects=1, max_objects=3, seed=0)
    splits = {"seen": ShapesDataset(config, "test_seen"), "held_out": ShapesDataset(config, "test_held_out")}
    candidates = {"seen": splits["seen"].seen_classes(), "held_out": splits["held_out"].held_out_classes()}
    labels = {
        key: np.array([class_index(s.colour, s.shape) for s in (ds.scene(i).salient for i in range(args.n))])
        for key, ds in splits.items()
    }

    domains = {**DOMAINS, **({} if args.registered_only else CANDIDATES)}
    results = {}
    print(f"{args.workdir} (step {trained.step}), {config.image_size} px, n = {args.n} per split")
    print(f"{'domain':45s} {'top1 seen':>9s} {'top1 held-out':>13s} {'render ms':>9s}")
    for name, domain in domains.items():
        row: dict = {"parameters": dataclasses.asdict(domain), "registered": name in DOMAINS}
        times = []
        for key, ds in splits.items():
            images, ms = render(ds, args.n, domain)
            times.append(ms)
            accuracy = zero_shot_accuracy(encoder.images(images), labels[key], class_embeds,
                                          candidate_classes=candidates[key], top_k=(1,))
            row[f"top1_{key}"] = round(accuracy["top1"], 4)
            row[f"n_{key}"] = accuracy["n"]
        row["render_ms_per_image"] = round(float(np.mean(times)), 3)
        results[name] = row
        print(f"{name:45s} {row['top1_seen']:9.3f} {row['top1_held_out']:13.3f} {row['render_ms_per_image']:9.2f}")

    out.write_text(results_json({
        "benchmark": "shapes_domain", "date": datetime.date.today().isoformat(), "machine": environment_facts(),
        "workdir": str(args.workdir), "step": trained.step, "image_size": config.image_size,
        "objects": [config.min_objects, config.max_objects], "seed": config.seed, "domains": results,
    }))  # fmt: skip
    print(f"saved {out}")


if __name__ == "__main__":
    main()
