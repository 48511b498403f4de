"""Does a run bind colours and shapes to the right object? ARO's attribution test (Yuksekgonul et al. 2023) on
shapes, for finished runs: NegCLIP's claim is that its hard negatives raise it over CLIP's (docs/demo.md).

    python benchmarks/binding_shapes.py --workdir W [--workdir W2 ...] [--num-examples 1000]
        [--out benchmarks/results/binding_shapes.json]   # (_2, _3... where a file is there already)

For each workdir, the `shapes_binding` evaluation (clip_jax/evaluate/suite.py) of its last checkpoint: how often a
test image's short caption scores above the same caption with the salient object's colour, or its shape, swapped
for another training pair's, on the held-out pairs the run was scored on (test, or validation for a validation run)
and on seen pairs; beside it the run's own held-out zero-shot top-1 from its results.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

import ml_collections

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # machine.py, result_files.py beside it
from machine import environment_facts  # noqa: E402
from result_files import checked_out_file, count  # noqa: E402

from clip_jax.evaluate.suite import eval_defaults, evaluate  # noqa: E402
from clip_jax.files import results_json
from clip_jax.train.loop import load_trained  # noqa: E402


def binding(workdir: str, num_examples: int) -> dict:
    trained = load_trained(workdir)
    config = trained.config
    config.eval.num_examples = num_examples
    config.evals = ml_collections.ConfigDict({"binding": eval_defaults("shapes_binding")})
    results = evaluate(config, trained.model, trained.params, trained.mesh, trained.tokenizer, method=trained.method)
    finished = json.loads((pathlib.Path(workdir) / "results.json").read_text())
    zero_shot = {k: finished[k] for k in ("zero_shot_top1", "zero_shot_top1_val", "zero_shot_top1_seen")
                 if k in finished}
    return {"step": trained.step, "method": config.method.name, **zero_shot,
            **{k: round(float(v), 4) for k, v in results.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", action="append", required=True, help="a finished run on shapes (repeat for several)")
    p.add_argument("--num-examples", type=count, default=1000, help="test images per split")
    p.add_argument("--out", help="the JSON file, or a folder for the default name (default: "
                   "benchmarks/results/binding_shapes.json; an earlier run's is never replaced: _2, _3...)")
    args = p.parse_args()
    for workdir in args.workdir:  # before any evaluation, not after the first workdir's
        if not (pathlib.Path(workdir) / "results.json").is_file():
            p.error(f"--workdir {workdir}: no finished run there (no results.json)")
    out = checked_out_file(args.out, pathlib.Path(__file__).parent / "results" / "binding_shapes.json")
    runs = {}
    for workdir in args.workdir:
        runs[workdir] = binding(workdir, args.num_examples)
        print(workdir, runs[workdir], flush=True)
    result = {"benchmark": "binding_shapes", "date": datetime.date.today().isoformat(),
              "machine": environment_facts(), "num_examples": args.num_examples, "runs": runs}
    out.write_text(results_json(result))
    print("saved", out)


if __name__ == "__main__":
    main()
