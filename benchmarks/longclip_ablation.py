"""Long-CLIP ablation on `shapes` (docs/longclip.md): with one fine-tuning budget, compare
  (a) the 77-token base, no fine-tune;
  (b) plain interpolation to 248 positions + long-caption fine-tune (CLIP loss);
  (c) keep-20 stretching (first 20 positions frozen) + long-caption fine-tune (CLIP loss);
  (d) (c) + primary component matching (the Long-CLIP loss),
on long-text retrieval R@1 (captions over 77 tokens), the hard-pairs test, short-text retrieval R@1 and zero-shot
top-1, for several fine-tuning seeds (one shared base).

  python benchmarks/longclip_ablation.py --workdir workdirs/longclip_ablation

Every phase is an ordinary `clip-jax` command (printed as it runs): `train --config configs/longclip_shapes.py:base`,
`stretch`, and `train --config configs/longclip_shapes.py:{interpolate,keep,longclip}` on a copy of the stretched
workdir. All models are then evaluated on the same data per seed: short-text retrieval and zero-shot on scenes of
1-2 objects (captions of 30-65 tokens), long-text retrieval and hard pairs on scenes of 5-9 objects. The table and
the raw numbers are saved as JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import shutil
import time

import numpy as np
from machine import environment_facts
from result_files import checked_out_file

from clip_jax import cli
from clip_jax.evaluate.suite import eval_defaults, evaluate
from clip_jax.files import results_json
from clip_jax.train.loop import load_trained

CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "longclip_shapes.py")
ARMS = {"interpolate": "(b) interpolate + long FT", "keep": "(c) keep-20 + long FT", "longclip": "(d) keep-20 + PCM"}
STRETCH = {"interpolate": ["--method", "interpolate", "--length", "248"], "keep": ["--keep", "20", "--ratio", "4"]}
METRICS = {
    "long_t2i_r1": "long T2I R@1", "long_i2t_r1": "long I2T R@1", "hard_pairs_acc": "hard pairs",
    "hard_pairs_image_acc": "hard pairs (per image)", "t2i_r1": "short T2I R@1", "i2t_r1": "short I2T R@1",
    "zero_shot_top1": "zero-shot top-1",
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="workdirs/longclip_ablation")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="fine-tuning seeds (data stream, eval set)")
    p.add_argument("--base-steps", type=int, help="override the base's total_steps")
    p.add_argument("--finetune-steps", type=int, help="override the fine-tunes' total_steps")
    p.add_argument("--eval-examples", type=int, default=500)
    p.add_argument("--out", help="the JSON file, or a folder for the default name (default: "
                   "benchmarks/results/longclip_ablation_shapes.json, regenerated in place)")
    return p.parse_args()


def run(argv: list[str], timings: dict, name: str) -> None:
    print("$ clip-jax " + " ".join(argv), flush=True)
    t0 = time.time()
    cli.main(argv)
    timings[name] = round(time.time() - t0, 1)


def evaluate_workdir(workdir: pathlib.Path, seed: int, n: int, timings: dict) -> dict[str, float]:
    """The suite on the common evaluation data of `seed` (whatever data the model was trained on)."""
    t0 = time.time()
    trained = load_trained(workdir)
    config = trained.config
    config.seed = seed
    config.data.min_objects, config.data.max_objects = 1, 2
    config.evals = {"shapes": eval_defaults("shapes"), "shapes_long_text": eval_defaults("shapes_long_text")}
    config.eval.num_examples = n
    results = evaluate(config, trained.model, trained.params, trained.mesh, trained.tokenizer)
    timings[f"eval_{workdir.name}_seed{seed}"] = round(time.time() - t0, 1)
    print(f"{workdir.name} (seed {seed}): " + ", ".join(f"{k} {results[k]:.3f}" for k in METRICS), flush=True)
    return {k: results[k] for k in METRICS}


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per arm and metric: mean, and min and max over seeds."""
    out = {}
    for arm, per_seed in runs.items():
        out[arm] = {}
        for key in METRICS:
            values = np.array([r[key] for r in per_seed])
            out[arm][key] = {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}
    return out


def table(summary: dict) -> str:
    names = {"base": "(a) base, no fine-tune", **ARMS}
    lines = ["| model | " + " | ".join(METRICS.values()) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for arm, row in summary.items():
        cells = [f"{100 * v['mean']:.1f} ({100 * v['min']:.1f}-{100 * v['max']:.1f})" for v in row.values()]
        lines.append(f"| {names[arm]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    # the committed result is regenerated in place on purpose (docs/longclip.md cites it), a file named by --out
    # kept; checked before hours of training
    out = checked_out_file(args.out, pathlib.Path(__file__).parent / "results" / "longclip_ablation_shapes.json",
                           replace=args.out is None)
    root = pathlib.Path(args.workdir)
    timings: dict[str, float] = {}
    load_before = os.getloadavg()
    base = root / "base"
    steps = lambda n: [f"--config.total_steps={n}"] if n else []
    if not (base / "results.json").exists():
        run(["train", "--config", f"{CONFIG}:base", "--workdir", str(base), *steps(args.base_steps)], timings, "base")
    for method, flags in STRETCH.items():
        if not (root / f"stretched_{method}").exists():
            run(["stretch", "--workdir", str(base), "--out-workdir", str(root / f"stretched_{method}"), *flags],
                timings, f"stretch_{method}")
    runs: dict[str, list[dict]] = {"base": [], **{arm: [] for arm in ARMS}}
    for seed in args.seeds:
        runs["base"].append({"seed": seed, **evaluate_workdir(base, seed, args.eval_examples, timings)})
        for arm in ARMS:
            workdir = root / f"{arm}_seed{seed}"
            if not (workdir / "results.json").exists():
                shutil.rmtree(workdir, ignore_errors=True)
                shutil.copytree(root / f"stretched_{'interpolate' if arm == 'interpolate' else 'keep'}", workdir)
                # (the run's own final evaluation kept small: every model is evaluated below on common data)
                run(["train", "--config", f"{CONFIG}:{arm}", "--workdir", str(workdir), f"--config.seed={seed}",
                     "--config.eval.num_examples=50", "--config.evals.shapes_long_text=None",
                     *steps(args.finetune_steps)],
                    timings, f"{arm}_seed{seed}")
            runs[arm].append({"seed": seed, **evaluate_workdir(workdir, seed, args.eval_examples, timings)})
    summary = summarise(runs)
    result = {
        "benchmark": "longclip_ablation",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {**environment_facts(), "load_average_before_after": [load_before, os.getloadavg()]},
        "args": vars(args),
        "metrics": METRICS,
        "seconds": timings,
        "summary": summary,
        "runs": runs,
        "table": table(summary),
    }
    out.write_text(results_json(result))
    print(result["table"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
