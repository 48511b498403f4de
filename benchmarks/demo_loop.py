"""The demo's step as the trainer runs it, with its input pipeline and without the cost of rendering: how much of
the loop's time over `train_step.py`'s step alone is the shapes source.

    python benchmarks/demo_loop.py [--config configs/demo.py] [--steps 150] [--rounds 2]

Each round trains the recipe for `steps` steps twice, in a process of its own each (`clip-jax train`, no evaluation,
no checkpoint but the last, no progress bar), taking turns: `pipeline`, the recipe as it is; `cached`, the same with
the shapes source's items rendered once per index modulo 512 and reused (a stream unlike the recipe's, so only its
time means anything). The seconds a step are the trainer's own (`metrics.jsonl`, 256 / samples_per_s) from the second
logged window on, past the compile. Prints and saves JSON (`--out`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # clip_jax from this checkout; machine.py, result_files.py
from machine import environment_facts  # noqa: E402
from result_files import checked_out_file, count  # noqa: E402

from clip_jax.files import results_json  # noqa: E402

VARIANTS = ("pipeline", "cached")
CACHED_ITEMS = 512


def train(config: str, workdir: str, steps: int, variant: str) -> None:
    """One run, in this process (the worker's side)."""
    from clip_jax import cli
    from clip_jax.data import shapes

    if variant == "cached":
        render = shapes.ShapesDataset.__getitem__
        items: dict = {}

        def cached(self, index):
            key = (self.split, index % CACHED_ITEMS)
            if key not in items:
                items[key] = render(self, index % CACHED_ITEMS)
            return items[key]

        shapes.ShapesDataset.__getitem__ = cached
    cli.main(["train", "--config", config, "--workdir", workdir, f"--config.total_steps={steps}",
              "--config.log.progress_bar=False", "--config.eval.every_steps=0",
              f"--config.checkpoint.every_steps={steps}", "--config.evals={}"])


def seconds_per_step(workdir: pathlib.Path) -> list[float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split") == "train" and "samples_per_s" in r]
    batch = json.loads((workdir / "config.json").read_text())["batch_size"]
    return [round(batch / r["samples_per_s"], 4) for r in train[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.py"))
    parser.add_argument("--steps", type=count, default=150)
    parser.add_argument("--rounds", type=count, default=2)
    parser.add_argument("--out", help="the JSON file, or a folder for the default name (default: "
                        "benchmarks/results/demo_loop_<host>.json; never over an earlier one: _2, _3...)")
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        train(args.config, args.worker[1], args.steps, args.worker[0])
        return
    out = checked_out_file(args.out, ROOT / "benchmarks" / "results" / f"demo_loop_{socket.gethostname()}.json")

    runs: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            with tempfile.TemporaryDirectory() as tmp:
                workdir = pathlib.Path(tmp) / "run"
                done = subprocess.run([sys.executable, __file__, "--config", args.config, "--steps", str(args.steps),
                                       "--worker", variant, str(workdir)], cwd=ROOT, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"the {variant} run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
                runs[variant].append(seconds_per_step(workdir))
                print(f"{variant}: {runs[variant][-1]} s a step", flush=True)

    result = {
        "config": args.config, "steps": args.steps, "rounds": args.rounds,
        "median_s_per_step": {v: statistics.median(t for run in runs[v] for t in run) for v in VARIANTS},
        "runs_s_per_step": runs, "date": datetime.date.today().isoformat(), "machine": environment_facts(),
    }
    print(json.dumps(result, indent=1))
    out.write_text(results_json(result))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
