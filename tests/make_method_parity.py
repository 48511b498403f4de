"""Writes tests/data/method_parity.json from the code as it is (see tests/test_method_parity.py)."""

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402
import pathlib  # noqa: E402

from tests.test_method_parity import CASES, FIGURES, figures, train_cases, trained_params  # noqa: E402

if __name__ == "__main__":
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        train_cases(pathlib.Path(tmp), sorted(CASES))
        for case in sorted(CASES):
            out[case] = figures(trained_params(pathlib.Path(tmp) / case))
    FIGURES.write_text(json.dumps(out) + "\n")
    print(f"wrote {FIGURES}")
