"""A small ModifiedResNet image tower against the demo's tiny ViT on `shapes`, at matched wall-clock, on this
machine (docs/resnet.md).

    python benchmarks/resnet_shapes.py [--vit-workdir workdirs/demo_b128] [--out-dir workdirs/resnet_shapes]

1. Pilot: 100 steps of each config (configs/demo.py:b128, configs/resnet_shapes.py), one after the other, reading their
   training throughput (samples/s of the logged steps after the first, which holds the compilation).
2. The ResNet trains for 1,500 x (its throughput / the ViT's) steps, rounded to 25: the demo's wall-clock.
3. Runs: the ViT (the demo: seed 0 is --vit-workdir, trained there first if absent) and the ResNet with GroupNorm at
   seeds 0 and 1, and the ResNet with "frozen_bn" (no normalisation from scratch) at seed 0. A run whose workdir
   holds results.json is read, not retrained.
Each is scored by its run's final evaluation: zero-shot top-1 on seen and held-out colour-shape pairs, and
retrieval R@1. Prints a table and saves benchmarks/results/resnet_shapes.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import shutil
import subprocess
import sys

from machine import environment_facts  # noqa: E402

from clip_jax.files import results_json  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO_STEPS = 1500
PILOT_STEPS = 100
CONFIGS = {"vit": "configs/demo.py:b128", "resnet": "configs/resnet_shapes.py"}
# (run name, config, seed)
RUNS = (("vit", CONFIGS["vit"], 0), ("vit", CONFIGS["vit"], 1), ("resnet_group", CONFIGS["resnet"], 0),
        ("resnet_group", CONFIGS["resnet"], 1), ("resnet_frozen_bn", "configs/resnet_shapes.py:frozen_bn", 0))
RESULTS = REPO / "benchmarks" / "results" / "resnet_shapes.json"
KEYS = ("zero_shot_top1_seen", "zero_shot_top1", "i2t_r1", "t2i_r1")


def train(config: str, workdir: pathlib.Path, *overrides: str) -> None:
    command = [sys.executable, "-m", "clip_jax", "train", "--config", config, "--workdir", str(workdir), *overrides]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def throughput(workdir: pathlib.Path) -> float:
    """Mean samples/s of the logged training steps after the first log (which includes compiling)."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if r.get("split") == "train"][1:]
    return sum(rates) / len(rates)


def run_pilot(out_dir: pathlib.Path) -> tuple[dict[str, float], int]:
    """Each config's throughput over PILOT_STEPS steps, and the resnet's step count at the demo's wall-clock."""
    pilot = {}
    for name, config in CONFIGS.items():
        workdir = out_dir / f"pilot_{name}"
        shutil.rmtree(workdir, ignore_errors=True)
        train(config, workdir, f"--config.total_steps={PILOT_STEPS}", "--config.eval.every_steps=0",
              f"--config.checkpoint.every_steps={PILOT_STEPS}")
        pilot[name] = round(throughput(workdir), 1)
        print(f"pilot {name}: {pilot[name]:.1f} samples/s", flush=True)
    return pilot, max(25, round(DEMO_STEPS * pilot["resnet"] / pilot["vit"] / 25) * 25)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vit-workdir", default="workdirs/demo_b128")
    p.add_argument("--out-dir", default="workdirs/resnet_shapes")
    p.add_argument("--resnet-steps", type=int, help="the resnet's steps recorded in results/resnet_shapes.json by an "
                   "earlier pilot: skips the pilot (to add or rerun runs at the same step count)")
    args = p.parse_args()
    out_dir = REPO / args.out_dir

    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.resnet_steps and previous.get("resnet_steps") == args.resnet_steps:  # the recorded pilot's step count
        pilot, resnet_steps = previous["pilot_samples_per_s"], args.resnet_steps
    else:
        pilot, resnet_steps = run_pilot(out_dir)

    runs = {}
    for name, config, seed in RUNS:
        workdir = REPO / args.vit_workdir if (name, seed) == ("vit", 0) else out_dir / f"{name}_seed{seed}"
        steps = DEMO_STEPS if name == "vit" else resnet_steps
        if not (workdir / "results.json").is_file():
            # eval and checkpoint at the end only: the resnet's step count is not a multiple of the demo's 500.
            train(config, workdir, f"--config.seed={seed}", f"--config.total_steps={steps}",
                  f"--config.eval.every_steps={steps}", f"--config.checkpoint.every_steps={steps}")
        results = json.loads((workdir / "results.json").read_text())
        run_config = json.loads((workdir / "config.json").read_text())
        runs[f"{name} seed {seed}"] = {
            "workdir": str(workdir.relative_to(REPO)), "steps": results["step"], "seed": seed,
            "vision": run_config["model"]["vision"], **{k: results[k] for k in KEYS}}
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": environment_facts(),
        "pilot_samples_per_s": pilot,
        "resnet_steps": resnet_steps,
        "matched": f"wall-clock: the resnet's {resnet_steps} steps take as long as the vit's {DEMO_STEPS} at the "
                   "pilot's throughputs",
        "runs": runs,
    }
    print(f"{'':24} {'steps':>6} " + " ".join(f"{k:>20}" for k in KEYS))
    for name, r in runs.items():
        print(f"{name:24} {r['steps']:>6} " + " ".join(f"{r[k]:>20.3f}" for k in KEYS))
    RESULTS.write_text(results_json(report))
    print(f"saved {RESULTS}")


if __name__ == "__main__":
    main()
