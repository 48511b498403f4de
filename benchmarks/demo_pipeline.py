"""CPU time of the demo's input pipeline: what `clip-jax train --config configs/demo.py` spends making one batch
(rendering `shapes` scenes, captions, tokenizing), which on the 2-core machine comes out of the train step's cores.

    python benchmarks/demo_pipeline.py [--config configs/demo.py] [--batches 8] [--rounds 5]

The recipe's own `train_dataset`, in this process with no prefetch thread and no workers, so that the process's
CPU time is the pipeline's alone: after one untimed batch, `rounds` rounds of `batches` batches each, the best round
and every round's figure per batch. Prints and saves JSON (`--out`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import socket
import sys
import tempfile
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import environment_facts  # noqa: E402
from result_files import checked_out_file, count  # noqa: E402

from clip_jax.config import load_config  # noqa: E402
from clip_jax.data import pipeline  # noqa: E402
from clip_jax.files import results_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.py"))
    parser.add_argument("--batches", type=count, default=8, help="batches per timed round")
    parser.add_argument("--rounds", type=count, default=5)
    parser.add_argument("--out", help="the JSON file, or a folder for the default name (default: "
                        "benchmarks/results/demo_pipeline_<host>.json; never over an earlier one: _2, _3...)")
    args = parser.parse_args()
    out = checked_out_file(args.out, ROOT / "benchmarks" / "results" / f"demo_pipeline_{socket.gethostname()}.json")

    config = load_config(args.config)
    config.data.workers, config.data.prefetch = 0, 0
    with tempfile.TemporaryDirectory() as workdir, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the demo's BPE warns that its corpus supports fewer tokens than asked
        tokenizer = pipeline.make_tokenizer(config, pathlib.Path(workdir), new_run=True)
    batches = iter(pipeline.train_dataset(config, tokenizer))
    next(batches)
    per_batch_ms = []
    for _ in range(args.rounds):
        cpu = time.process_time()
        for _ in range(args.batches):
            next(batches)
        per_batch_ms.append((time.process_time() - cpu) / args.batches * 1e3)

    result = {
        "config": args.config, "batch_size": config.batch_size, "image_size": config.model.vision.image_size,
        "cpu_ms_per_batch": round(min(per_batch_ms), 1), "rounds_cpu_ms_per_batch": [round(t, 1) for t in per_batch_ms],
        "cpu_us_per_example": round(min(per_batch_ms) / config.batch_size * 1e3, 1),
        "date": datetime.date.today().isoformat(), "machine": environment_facts(),
    }
    print(json.dumps(result, indent=1))
    out.write_text(results_json(result))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
