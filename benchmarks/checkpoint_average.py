"""Would averaging a run's last weights (an EMA, SWA's tail average) lift its evaluations? A probe on finished runs,
before any such option is built (docs/demo.md).

    python benchmarks/checkpoint_average.py --workdir W [--workdir W2 ...] [--steps 1000 1050 1100 1150 1200]
        [--out benchmarks/results/checkpoint_average.json]   # (_2, _3... where a file is there already)

For each workdir: the run's evaluations (its config's `evals`) of every checkpoint in `--steps` (default: every
checkpoint the workdir holds), then of the uniform average of the last k of them for k = 2, 3, ... (the last step's
always included). A run keeps few checkpoints by default (`checkpoint.max_to_keep`): train the run to probe with
`--config.checkpoint.every_steps=50 --config.checkpoint.max_to_keep=30`; the checkpoints' frequency does not change
the run's steps.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # machine.py, result_files.py beside it
from machine import environment_facts  # noqa: E402
from result_files import checked_out_file  # noqa: E402

from clip_jax.evaluate.suite import evaluate  # noqa: E402
from clip_jax.files import results_json
from clip_jax.train.checkpoint import Checkpointer, abstract_like  # noqa: E402
from clip_jax.train.loop import load_trained  # noqa: E402


def uniform_average(trees: list) -> object:
    """The leafwise mean of parameter trees of one shape."""
    return jax.tree.map(lambda *leaves: sum(leaves) / len(leaves), *trees)


def probe(workdir: str, steps: list[int] | None) -> dict:
    if steps is None:
        steps = sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())
    last = load_trained(workdir, steps[-1])  # the model, tokenizer and method once; the other steps' parameters alone
    checkpointer = Checkpointer(workdir, last.config.checkpoint, reader=True)
    params = {step: last.params if step == steps[-1] else checkpointer.restore_params(step, abstract_like(last.params))
              for step in steps}
    checkpointer.close()

    def scores(tree) -> dict[str, float]:
        results = evaluate(last.config, last.model, tree, last.mesh, last.tokenizer, method=last.method)
        return {k: round(float(v), 4) for k, v in results.items()}

    out = {"steps": steps, "single": {}, "tail_average": {}}
    for step in steps:
        out["single"][str(step)] = scores(params[step])
        print(workdir, "step", step, out["single"][str(step)], flush=True)
    for k in range(2, len(steps) + 1):
        tail = steps[-k:]
        name = f"{tail[0]}-{tail[-1]} ({k} checkpoints)"
        out["tail_average"][name] = scores(uniform_average([params[s] for s in tail]))
        print(workdir, "average of steps", name, out["tail_average"][name], flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", action="append", required=True, help="a finished run (repeat for several)")
    p.add_argument("--steps", type=int, nargs="+", help="the checkpoints, oldest first (default: all of them)")
    p.add_argument("--out", help="the JSON file, or a folder for the default name (default: "
                   "benchmarks/results/checkpoint_average.json; an earlier run's is never replaced: _2, _3...)")
    args = p.parse_args()
    if args.steps and args.steps != sorted(args.steps):
        p.error("--steps must be given oldest first")
    for workdir in args.workdir:  # before any evaluation, not after the first workdir's
        if not (pathlib.Path(workdir) / "checkpoints").is_dir():
            p.error(f"--workdir {workdir}: no run there (no checkpoints folder)")
    out = checked_out_file(args.out, pathlib.Path(__file__).parent / "results" / "checkpoint_average.json")
    result = {
        "benchmark": "checkpoint_average",
        "date": datetime.date.today().isoformat(),
        "machine": environment_facts(),
        "runs": {w: probe(w, args.steps) for w in args.workdir},
    }
    out.write_text(results_json(result))
    print("saved", out)


if __name__ == "__main__":
    main()
