"""CLIP against SLIP on `shapes` (docs/slip.md), at equal steps and at about equal wall-clock, on this machine.

    python benchmarks/slip_shapes.py [--steps 500] [--seeds 0 1] [--out-dir workdirs/slip_shapes]
        [--clip-long-workdirs workdirs/demo workdirs/resnet_shapes/vit_seed1]

Runs, per seed, `--steps` steps of batch 128 (the demo's setting with a shorter schedule): CLIP (configs/demo.py),
SLIP with the reference's views (configs/slip_shapes.py) and SLIP with colour-preserving views
(configs/slip_shapes.py:colour). The time-matched CLIP is the demo's 1,500 steps (a step of SLIP costs about three
of CLIP's): the workdirs of `--clip-long-workdirs` (one per seed) if given, else trained. Each run's training time
is read from its metrics (the logged steps over their throughput, compilation included), so the match is stated,
not assumed. A run whose workdir holds results.json is read, not retrained.

Scores: the run's final evaluation (zero-shot top-1 on seen and held-out colour-shape pairs, retrieval R@1) and
linear probes on its frozen, normalised image embeddings: a ridge classifier of the salient object's colour and,
separately, of its shape, fitted on 200 `train` images and scored on 1,000 `test` images, all rendered in the
`shifted` domain (noise, blur, low contrast, unseen backgrounds: on clean images with more examples every probe of
the demo model is at 1.000). Prints a table and
saves benchmarks/results/slip_shapes.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import subprocess
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from machine import environment_facts  # noqa: E402

from clip_jax.data.pipeline import shapes_config  # noqa: E402
from clip_jax.data.shapes import COLOURS, SHAPES, ShapesDataset  # noqa: E402
from clip_jax.evaluate.encoder import Encoder  # noqa: E402
from clip_jax.files import results_json
from clip_jax.train.loop import load_trained  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "slip_shapes.json"
ARMS = {"clip": "configs/demo.py:b128", "slip_simclr": "configs/slip_shapes.py",
        "slip_colour": "configs/slip_shapes.py:colour"}
LONG_STEPS = 1500
KEYS = ("zero_shot_top1_seen", "zero_shot_top1", "i2t_r1", "t2i_r1")
PROBE_TRAIN, PROBE_TEST, RIDGE = 200, 1000, 1e-2


def train(config: str, workdir: pathlib.Path, steps: int, seed: int) -> None:
    command = [sys.executable, "-m", "clip_jax", "train", "--config", config, "--workdir", str(workdir),
               f"--config.seed={seed}", f"--config.total_steps={steps}", f"--config.eval.every_steps={steps}",
               f"--config.checkpoint.every_steps={steps}"]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def training_seconds(workdir: pathlib.Path) -> float:
    """The logged training steps over their throughput (the first window includes compiling; evaluations not)."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train"]
    steps = np.diff([0] + [r["step"] for r in train])
    batch = json.loads((workdir / "config.json").read_text())["batch_size"]
    return float(sum(n * batch / r["samples_per_s"] for n, r in zip(steps, train, strict=True)))


def labelled_images(config, split: str, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n images of `split` in the `shifted` rendering domain (clean images saturate every probe) and their salient
    object's colour and shape indices."""
    dataset = ShapesDataset(dataclasses.replace(shapes_config(config), domain="shifted"), split)
    items = [dataset[i] for i in range(n)]
    labels = np.array([item["label"] for item in items])
    return np.stack([item["image"] for item in items]), labels // len(SHAPES), labels % len(SHAPES)


def ridge_accuracy(train_x, train_y, test_x, test_y, classes: int) -> float:
    """A ridge classifier (least squares onto one-hot targets, with a bias): fitted in closed form, no tuning."""
    add_bias = lambda x: np.concatenate([x, np.ones((len(x), 1), x.dtype)], axis=1)
    x = add_bias(train_x.astype(np.float64))
    weights = np.linalg.solve(x.T @ x + RIDGE * np.eye(x.shape[1]), x.T @ np.eye(classes)[train_y])
    return float(np.mean(np.argmax(add_bias(test_x.astype(np.float64)) @ weights, axis=1) == test_y))


def probes(workdir: pathlib.Path) -> dict[str, float]:
    trained = load_trained(workdir)
    encoder = Encoder(trained.model, trained.params, trained.mesh, 250)
    train_images, train_colour, train_shape = labelled_images(trained.config, "train", PROBE_TRAIN)
    test_images, test_colour, test_shape = labelled_images(trained.config, "test", PROBE_TEST)
    train_x, test_x = encoder.images(train_images), encoder.images(test_images)
    return {"probe_colour": ridge_accuracy(train_x, train_colour, test_x, test_colour, len(COLOURS)),
            "probe_shape": ridge_accuracy(train_x, train_shape, test_x, test_shape, len(SHAPES))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out-dir", default="workdirs/slip_shapes")
    p.add_argument("--clip-long-workdirs", nargs="*", default=[], help="one CLIP run of 1,500 steps per seed")
    args = p.parse_args()
    out_dir = REPO / args.out_dir
    if args.clip_long_workdirs and len(args.clip_long_workdirs) != len(args.seeds):
        raise SystemExit("--clip-long-workdirs: give one workdir per seed")

    runs = {}
    for i, seed in enumerate(args.seeds):
        plan = [(arm, config, args.steps, out_dir / f"{arm}_seed{seed}") for arm, config in ARMS.items()]
        long_workdir = (REPO / args.clip_long_workdirs[i] if args.clip_long_workdirs
                        else out_dir / f"clip_{LONG_STEPS}_seed{seed}")
        plan.append((f"clip_{LONG_STEPS}", ARMS["clip"], LONG_STEPS, long_workdir))
        for arm, config, steps, workdir in plan:
            if not (workdir / "results.json").is_file():
                train(config, workdir, steps, seed)
            results = json.loads((workdir / "results.json").read_text())
            runs[f"{arm} seed {seed}"] = {"arm": arm, "seed": seed, "steps": results["step"],
                                          "workdir": str(workdir.relative_to(REPO)),
                                          "train_seconds": round(training_seconds(workdir), 1),
                                          **{k: results[k] for k in KEYS}, **probes(workdir)}
            print(runs[f"{arm} seed {seed}"], flush=True)

    columns = ("steps", "train_seconds", *KEYS, "probe_colour", "probe_shape")
    arms = list(dict.fromkeys(r["arm"] for r in runs.values()))
    means = {arm: {c: float(np.mean([r[c] for r in runs.values() if r["arm"] == arm])) for c in columns}
             for arm in arms}
    print(f"{'mean over seeds':16} " + " ".join(f"{c:>19}" for c in columns))
    for arm, row in means.items():
        print(f"{arm:16} " + " ".join(f"{row[c]:>19.3f}" for c in columns))
    RESULTS.write_text(results_json({
        "date": datetime.date.today().isoformat(),
        "machine": environment_facts(),
        "probe": {"train_images": PROBE_TRAIN, "test_images": PROBE_TEST, "ridge": RIDGE,
                  "features": "normalised image embeddings"},
        "means": means, "runs": runs,
    }))
    print(f"saved {RESULTS}")


if __name__ == "__main__":
    main()
