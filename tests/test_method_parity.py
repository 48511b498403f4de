"""Moving CLIP, SigLIP and Long-CLIP onto the method layer changed no arithmetic: 30 training steps of
`configs/demo.py` (CLIP loss) and of `configs/longclip_shapes.py` (at a shorter context, for time) end at the
parameters that the code before the method layer reached (commit df73339; max abs difference <= 1e-6). The file also
holds SigLIP's figures (the demo with method.name=siglip). The cases guard a migration that has long landed, and
the suite's time is better spent on the methods' contract (tests/test_methods.py: every method's sharded step against
one device): they run on request, `CLIP_JAX_PARITY_CASES=clip,longclip python -m pytest tests/test_method_parity.py`
(CLIP's and SigLIP's losses are compared with references in tests/test_losses.py in every run).

`tests/data/method_parity.json` holds, for every parameter, 64 entries at fixed positions and the sum, as that code
computed them: `python tests/make_method_parity.py` in a checkout of df73339, with the overrides of this file in
that version's keys (loss.* for method.*, eval.long_text for evals.shapes_long_text) wrote it."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from clip_jax.train.checkpoint import read_state

REPO = pathlib.Path(__file__).resolve().parents[1]
FIGURES = pathlib.Path(__file__).parent / "data" / "method_parity.json"
STEPS = 30
COMMON = [
    f"--config.total_steps={STEPS}", "--config.batch_size=16", "--config.optimizer.warmup_steps=5",
    "--config.checkpoint.every_steps=1000", "--config.log.every_steps=10", "--config.log.progress_bar=False",
    "--config.log.tensorboard=False", "--config.evals.shapes=None",  # parameters only: no final evaluation
]
DEMO = ["--config", str(REPO / "configs" / "demo.py"), "--config.model.vision.image_size=64"]
ALL_CASES = {
    "clip": DEMO,
    # Long-CLIP from scratch (a stretched base would need a pretraining run first) at 128 tokens, keeping the first
    # 20 positions frozen as the recipe does; the PCA over the global batch: the 8 test devices hold 2 rows each.
    "longclip": ["--config", str(REPO / "configs" / "longclip_shapes.py"), "--config.evals.shapes_long_text=None",
                 "--config.model.text.context_length=128", "--config.method.short_context_length=40",
                 "--config.method.pca_components=8", "--config.method.pca_scope=global"],
}
CASES = {case: ALL_CASES[case] for case in os.environ.get("CLIP_JAX_PARITY_CASES", "").split(",") if case}
SAMPLES = 64


def train_cases(root: pathlib.Path, cases) -> None:
    """Trains `cases` into root/<case>, in one process of their own with XLA's default CPU code generation, which the
    figures were computed with (the test session compiles without LLVM's optimisations, tests/conftest.py: faster to
    compile, not bit-identical)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "JAX_DEFAULT_MATMUL_PRECISION": "float32"}
    script = "import json, sys\nfrom clip_jax import cli\nfor args in json.loads(sys.argv[1]):\n    cli.main(args)"
    runs = [["train", "--workdir", str(root / case), *CASES[case], *COMMON] for case in cases]
    result = subprocess.run([sys.executable, "-c", script, json.dumps(runs)], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]


def trained_params(workdir: pathlib.Path) -> dict[str, np.ndarray]:
    params = read_state(workdir, STEPS)["params"]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree.flatten_with_path(params)[0]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("parity")
    train_cases(root, sorted(CASES))
    return root


def figures(params: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per parameter: SAMPLES entries at positions fixed by the parameter's size, and the float64 sum."""
    out = {}
    for name, value in params.items():
        flat = value.reshape(-1)
        positions = np.sort(np.random.default_rng(flat.size).choice(flat.size, min(SAMPLES, flat.size), replace=False))
        out[name] = {"positions": positions.tolist(), "values": flat[positions].astype(float).tolist(),
                     "sum": float(flat.astype(np.float64).sum()), "shape": list(value.shape)}
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_reaches_the_parameters_of_the_code_before_the_method_layer(case, trained):
    want = json.loads(FIGURES.read_text())[case]
    got = trained_params(trained / case)
    assert sorted(got) == sorted(want)
    worst = 0.0
    for name, w in want.items():
        flat = got[name].reshape(-1)
        assert list(got[name].shape) == w["shape"], name
        worst = max(worst, float(np.max(np.abs(flat[w["positions"]] - np.asarray(w["values"])))))
        np.testing.assert_allclose(flat.astype(np.float64).sum(), w["sum"], rtol=1e-5, atol=1e-4, err_msg=name)
    assert worst <= 1e-6
