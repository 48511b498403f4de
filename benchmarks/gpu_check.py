"""The frame of a GPU check script (`attention_parity.py`, `layer_norm.py`): its command line, the refusal off an
NVIDIA GPU, and a JSON file saved case by case, so that a check stopped by its time limit keeps what it measured."""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import jax

from clip_jax.files import results_json
from clip_jax.models.layers import cuda_compute_capability

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # result_files.py beside it
from machine import environment_facts  # noqa: E402
from result_files import checked_out_folder, new_result_path  # noqa: E402


def run_gpu_check(name: str, doc: str, needs: str, cases: dict[str, Any], measure: Callable[[Any], dict]) -> None:
    """Parses `--out`; off an NVIDIA GPU prints `needs` and measures nothing; else `measure(case)` for every case,
    saved after each into `<name>_<device>_<date>.json` (`_2`, `_3`... where the day's earlier run saved one)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = p.parse_args()
    if cuda_compute_capability() is None:  # before the --out folder is made: nothing is written
        sys.exit(f"{name}: {needs}; this machine runs on {jax.default_backend()}: nothing measured")
    out = checked_out_folder(args.out)
    device = jax.devices()[0]
    result = {"benchmark": name, "date": datetime.date.today().isoformat(), "device_kind": device.device_kind,
              "jax": jax.__version__, "machine": environment_facts(), "shapes": {}}
    path = new_result_path(out / f"{name}_{device.device_kind.replace(' ', '_')}_{result['date']}.json")
    for case_name, case in cases.items():
        result["shapes"][case_name] = measure(case)
        print(case_name, json.dumps(result["shapes"][case_name]), flush=True)
        path.write_text(results_json(result))
    print(f"saved {path}")


if __name__ == "__main__":  # the frame of the checks, not a check
    sys.exit("gpu_check.py is the frame of attention_parity.py and layer_norm.py: run one of those")
