"""The few-shot experiment of docs/few_shot.md: every few-shot method, zero-shot CLIP and the linear probe, at 1, 2,
4, 8 and 16 shots x 3 seeds, base/new split, on shapes' `shifted` rendering domain, from one demo CLIP.

    python3 benchmarks/few_shot_shapes.py [--methods coop,cocoop,...] [--shots 1,2,4,8,16] [--seeds 1,2,3]

Each run is the method's shapes recipe (configs/<method>/shapes.py) with `few_shot.shots` and `few_shot.seed` set and
its steps scaled to the sample (below), trained in this process from `workdirs/demo` (trained first with
configs/demo.py:b128, the demo recipe the figures were measured from, when missing). A run's workdir is kept under
workdirs/few_shot_shapes/ and a finished one is read back, not retrained, so an interrupted experiment continues where
it stopped. Prints the table and the reference claims, each held or not held, and saves
benchmarks/results/few_shot_shapes.json: method -> shots -> base, new and hm as mean and std over the seeds (and each
run's value), WiSE-FT's curve over its mixing alphas, the claims; and the plot of accuracy against shots beside it
(few_shot_shapes.png).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # result_files.py
from machine import environment_facts  # noqa: E402
from result_files import checked_out_file  # noqa: E402

from clip_jax.config import load_config  # noqa: E402
from clip_jax.files import results_json  # noqa: E402

# method -> its recipe. "zero_shot" is the demo CLIP scored by the same few_shot evaluation.
RECIPES = {
    "linear_probe": "configs/linear_probe/shapes.py",
    "coop": "configs/coop/shapes.py",
    "cocoop": "configs/cocoop/shapes.py",
    "maple": "configs/maple/shapes.py",
    "clip_adapter": "configs/clip_adapter/shapes.py",
    "tip_adapter": "configs/tip_adapter/shapes.py",
    "tip_adapter_f": "configs/tip_adapter/shapes.py:f",
    "wise_ft": "configs/wise_ft/shapes.py",
}
GROUPS = ("base", "new", "hm")
WISE_FT_ALPHAS = (0, 0.25, 0.5, 0.75, 1)  # of the recipe's 0, 0.1, ..., 1: five evaluations a run instead of eleven


def scaled_steps(recipe_steps: int, shots: int) -> int:
    """The recipes' steps are for 16 shots. Fewer shots train for fewer epochs of a smaller sample, as CoOp's
    reference schedule does (50 epochs at 1 shot, 100 at 2 and 4, 200 at 8 and 16): steps in proportion to
    epochs x examples, with a floor of 50 so that the smallest samples still converge. A training-free recipe (one
    step) stays one step."""
    if recipe_steps <= 1:
        return recipe_steps
    epochs = {1: 50, 2: 100, 4: 100}.get(shots, 200) / 200
    return max(50, math.ceil(recipe_steps * epochs * shots / 16))


def run_config(method: str, shots: int, seed: int):
    config = load_config(str(ROOT / RECIPES[method]), [])
    config.init_from = str(ROOT / "workdirs/demo")
    config.few_shot.update(shots=shots, seed=seed)
    config.total_steps = scaled_steps(config.total_steps, shots)
    config.checkpoint.every_steps = config.total_steps
    config.log.update(progress_bar=False, tensorboard=False)
    if method == "wise_ft":  # the shifted domain only: the recipe's second (clean) domain is saturated at zero-shot
        config.evals.few_shot.shapes_domain = ""
    return config


def train_run(method: str, shots: int, seed: int, root: pathlib.Path) -> dict:
    """The few_shot metrics of one run ({"base", "new", "hm"}; the linear probe has base only), trained unless its
    workdir already holds the finished run; WiSE-FT adds its curve over alphas ("alphas")."""
    from clip_jax.train.loop import train_and_evaluate

    config = run_config(method, shots, seed)
    workdir = root / f"{method}_k{shots}_s{seed}"
    done = workdir / "results.json"
    results = json.loads(done.read_text()) if done.exists() else {}
    if results.get("step") != config.total_steps:
        start = time.perf_counter()
        results = train_and_evaluate(config, workdir)
        results["wall_s"] = time.perf_counter() - start
        done.write_text(results_json(results))
    run = {g: results[f"few_shot_{g}"] for g in GROUPS if f"few_shot_{g}" in results}
    run["wall_s"] = results.get("wall_s")
    if method == "wise_ft":
        run["alphas"] = wise_ft_curve(workdir)
    return run


def wise_ft_curve(workdir: pathlib.Path) -> dict[str, dict[str, float]]:
    """alpha -> few_shot metrics of the interpolated weights (`clip-jax wise-ft`), computed once per run."""
    out = workdir / "wise_ft.json"
    if not out.exists():
        from clip_jax.cli import main

        main(["wise-ft", "--workdir", str(workdir), "--alphas", ",".join(map(str, WISE_FT_ALPHAS)), "--out", str(out)])
    return json.loads(out.read_text())


def zero_shot() -> dict:
    """The demo CLIP's few_shot metrics: they depend on neither the shots nor the seed (the test set is fixed)."""
    from clip_jax.evaluate.suite import evaluate
    from clip_jax.train.loop import load_trained

    trained = load_trained(ROOT / "workdirs/demo")
    config = run_config("coop", 16, 1)  # the few_shot task and evaluation of every run
    results = evaluate(config, trained.model, trained.params, trained.mesh, trained.tokenizer)
    return {g: results[f"few_shot_{g}"] for g in GROUPS}


def summarise_values(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "runs": values}


def summarise(runs: list[dict]) -> dict:
    """group -> mean, std (over seeds) and the runs' values, for the groups the runs report."""
    return {g: summarise_values([r[g] for r in runs]) for g in GROUPS if all(g in r for r in runs)}


def claims(table: dict, shots: list[int]) -> list[dict]:
    """The reference claims (issue 11), each judged on the means over seeds; `margin` is the difference of means
    and `spread` the larger of the two seeds' standard deviations, so a margin under the spread is within noise."""
    def mean(method, k, group):
        return table.get(method, {}).get(str(k), {}).get(group, {}).get("mean")

    def std(method, k, group):
        return table.get(method, {}).get(str(k), {}).get(group, {}).get("std", 0.0)

    out = []

    def claim(text, comparisons):
        """comparisons: (k, group, better method, worse method); held where every one holds."""
        rows = []
        for k, group, better, worse in comparisons:
            a, b = mean(better, k, group), mean(worse, k, group)
            if a is None or b is None:
                continue
            rows.append({"shots": k, "group": group, "better": better, "worse": worse, "margin": a - b,
                         "spread": max(std(better, k, group), std(worse, k, group))})
        if rows:
            held = all(r["margin"] > 0 for r in rows)
            out.append({"claim": text, "held": held, "comparisons": rows})

    many = [k for k in shots if k >= 4]
    claim("CoOp beats zero-shot on base classes from a few (4) shots on",
          [(k, "base", "coop", "zero_shot") for k in many])
    claim("CoOp beats the linear probe at 1-2 shots", [(k, "base", "coop", "linear_probe") for k in shots if k <= 2])
    claim("CoOp falls below zero-shot on new classes (16 shots)", [(16, "new", "zero_shot", "coop")])
    claim("CoCoOp's new-class accuracy beats CoOp's (16 shots)", [(16, "new", "cocoop", "coop")])
    claim("CoCoOp's harmonic mean beats CoOp's (16 shots)", [(16, "hm", "cocoop", "coop")])
    claim("MaPLe's harmonic mean beats CoCoOp's (16 shots)", [(16, "hm", "maple", "cocoop")])
    claim("Tip-Adapter beats zero-shot on base classes with no training (every shot count)",
          [(k, "base", "tip_adapter", "zero_shot") for k in shots])
    claim("Tip-Adapter-F beats Tip-Adapter on base classes (16 shots)", [(16, "base", "tip_adapter_f", "tip_adapter")])
    return out


def wise_ft_claims(curves: dict) -> list[dict]:
    """WiSE-FT's claim, on base and on new classes: at each shot count, some alpha strictly between 0 and 1 beats
    both endpoints (means over seeds); held where it does at every shot count."""
    out = []
    for group in ("base", "new"):
        rows = []
        for k in sorted(curves, key=int):
            accuracy = {float(a): c[f"few_shot_{group}"]["mean"] for a, c in curves[k].items()}
            alphas = sorted(accuracy)
            best = max(alphas[1:-1], key=accuracy.get)
            ends = max(accuracy[alphas[0]], accuracy[alphas[-1]])
            rows.append({"shots": int(k), "group": group, "best_alpha": best, "best": accuracy[best],
                         "best_endpoint": ends, "margin": accuracy[best] - ends})
        if rows:
            out.append({"claim": f"WiSE-FT: a mixing alpha in (0, 1) beats both endpoints ({group} classes, shifted "
                        "domain)", "held": all(r["margin"] > 0 for r in rows), "comparisons": rows})
    return out


def plot(table: dict, shots: list[int], path: pathlib.Path) -> None:
    """Accuracy against shots, one line per method (mean over seeds, the std as a band): base, new, HM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    colours = dict(zip(table, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2, strict=False))  # one per method
    for ax, group in zip(axes, GROUPS, strict=True):
        for method, by_shots in table.items():
            ks = [k for k in shots if group in by_shots.get(str(k), {})]
            if not ks:
                continue
            mean = np.array([by_shots[str(k)][group]["mean"] for k in ks])
            std = np.array([by_shots[str(k)][group]["std"] for k in ks])
            style = "--" if method == "zero_shot" else "-o"
            ax.plot(ks, mean, style, label=method, markersize=4, color=colours[method])
            ax.fill_between(ks, mean - std, mean + std, alpha=0.15, color=colours[method])
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.set_xlabel("shots per class")
        ax.set_title({"base": "base classes", "new": "new classes", "hm": "harmonic mean"}[group])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (shapes, shifted domain)")
    axes[0].legend(fontsize=8, loc="lower right")  # the base panel has every method (the linear probe: base only)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(["zero_shot", *RECIPES]))
    parser.add_argument("--shots", default="1,2,4,8,16")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--runs", default=str(ROOT / "workdirs/few_shot_shapes"))
    parser.add_argument("--out", help="the JSON file, or a folder for the default name (default: "
                        "benchmarks/results/few_shot_shapes.json, regenerated in place)")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = set(methods) - {"zero_shot", *RECIPES}
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose among zero_shot, {', '.join(RECIPES)}")
    shots = [int(k) for k in args.shots.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    # read back and extended, method by method: the committed result is regenerated in place on purpose
    out = checked_out_file(args.out, ROOT / "benchmarks/results/few_shot_shapes.json", replace=True)
    root = pathlib.Path(args.runs)
    root.mkdir(parents=True, exist_ok=True)

    import jax

    # Runs of one method differ in their data, not their programs: compile each program once for the whole sweep.
    jax.config.update("jax_compilation_cache_dir", str(root / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    if not (ROOT / "workdirs/demo/config.json").exists():
        from clip_jax.train.loop import train_and_evaluate

        train_and_evaluate(load_config(str(ROOT / "configs/demo.py") + ":b128", []), ROOT / "workdirs/demo")

    saved = json.loads(out.read_text()) if out.exists() else {}
    table, walls, curves = saved.get("methods", {}), saved.get("wall_s", {}), saved.get("wise_ft_alphas", {})
    start = time.perf_counter()
    for method in methods:
        if method == "zero_shot":
            fixed = summarise([zero_shot()])
            table[method] = {str(k): fixed for k in shots}
            continue
        table[method], walls[method] = {}, {}
        for k in shots:
            runs = [train_run(method, k, seed, root) for seed in seeds]
            table[method][str(k)] = summarise(runs)
            walls[method][str(k)] = float(np.mean([r["wall_s"] for r in runs if r["wall_s"] is not None] or [0]))
            print(f"{method:14s} {k:2d} shots: " + "  ".join(
                f"{g} {v['mean']:.3f}±{v['std']:.3f}" for g, v in table[method][str(k)].items()), flush=True)
            if method == "wise_ft":  # alpha -> metric -> mean, std and runs over the seeds
                curves[str(k)] = {a: {m: summarise_values([r["alphas"][a][m] for r in runs])
                                      for m in runs[0]["alphas"][a]} for a in runs[0]["alphas"]}
    judged = claims(table, shots) + wise_ft_claims(curves)
    result = {
        "experiment": "few-shot transfer on shapes (docs/few_shot.md)",
        "setting": {"checkpoint": "workdirs/demo", "domain": "shifted", "classes": "20 base + 20 new colour-shape "
                    "pairs", "test_examples": run_config("coop", 16, 1).few_shot.eval_examples, "shots": shots,
                    "seeds": seeds, "steps": {m: {str(k): run_config(m, k, 1).total_steps for k in shots}
                                              for m in RECIPES if m in table}},
        "methods": table,
        "wise_ft_alphas": curves,
        "claims": judged,
        "wall_s": walls,
        "machine": environment_facts(),
        "date": datetime.date.today().isoformat(),
        "sweep_wall_s": time.perf_counter() - start,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(results_json(result))
    plot(table, shots, out.with_suffix(".png"))
    for c in judged:
        margins = ", ".join(f"{r['shots']}: {r['margin']:+.3f}" for r in c["comparisons"])
        print(f"[{'held' if c['held'] else 'NOT held'}] {c['claim']}  (margin by shots {margins})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
