"""Expected training throughput per topology: COMPUTED from the analytic FLOPs, at ASSUMED MFUs, not measured.

  python3 launch/expected_perf.py      # prints the markdown tables of docs/launch.md

samples/s = devices x peak FLOP/s per device x MFU / training FLOPs per sample, with the FLOPs the trainer itself
counts for the recipe (its method's `flops_per_example`: 3x the forward matmuls of what trains, 1x of what is
frozen, every caption field's text pass; remat not counted; what the logged `mfu` divides by) and the vendor peaks of
clip_jax.models.flops.PEAK_FLOPS. Data loading, evaluation and checkpoint pauses are not included.
"""

from __future__ import annotations

import pathlib
import textwrap

import flax.linen as nn
import jax

from clip_jax.config import check_devices, load_config
from clip_jax.errors import ConfigError
from clip_jax.methods import get_method
from clip_jax.models.flops import PEAK_FLOPS
from clip_jax.train.state import trainable_mask

REPO = pathlib.Path(__file__).resolve().parents[1]

MFUS = (0.40, 0.55)  # assumptions: a plausible range for a well-sharded ViT, not measurements of this code

# (label, PEAK_FLOPS key, JAX devices, hosts). A JAX device is a chip on v4/v5p (megacore) and v5e, one GPU on GPUs.
# v4-N and v5p-N count TensorCores (2 per chip), v5litepod-N counts chips.
TPUS = [
    ("v4-32", "TPU v4", 16, 4),
    ("v5p-64", "TPU v5p", 32, 8),
    ("v5litepod-16", "TPU v5 lite", 16, 2),
]
GPUS = [
    ("1 node x 8 H100", "NVIDIA H100", 8, 1),
    ("1 node x 8 A100", "NVIDIA A100", 8, 1),
    ("2 nodes x 8 H100", "NVIDIA H100", 16, 2),
]

# (title, recipe, global batch, samples to report the duration of, what those samples are)
EXAMPLES = [
    ("B/16 pretraining (`configs/pretrain.py:B/16`)", "configs/pretrain.py:B/16", 32768, 32768 * 100_000,
     "the config's 100k steps x 32768 (3.3B samples)", TPUS + GPUS[:1]),
    ("Long-CLIP L/14 fine-tuning (`configs/longclip_l14.py`, 248 + 77 text tokens)", "configs/longclip_l14.py",
     1024, 1_000_000, "1M image-text pairs", GPUS + TPUS[1:2]),
]


def flops_per_sample(recipe: str) -> float:
    """The training FLOPs of one example of a recipe (`path.py[:arg]`, from the repository), as the trainer counts
    them: its method's count, given the parameters that its `optimizer.frozen` leaves trainable."""
    path, _, arg = recipe.partition(":")
    config = load_config(str(REPO / path) + (f":{arg}" if arg else ""))
    method = get_method(config)
    model = method.model()
    params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), *method.init_inputs())["params"])
    return method.flops_per_example(trainable_mask(params, config.optimizer.frozen))


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def refusal(recipe: str, batch: int, devices: int) -> str | None:
    """Why the trainer (and the launchers, before the queue) would refuse the recipe at `batch` on `devices`."""
    path, _, arg = recipe.partition(":")
    config = load_config(str(REPO / path) + (f":{arg}" if arg else ""), [f"--config.batch_size={batch}"])
    try:
        check_devices(config, devices)
    except ConfigError as e:
        return str(e)
    return None


def table(recipe: str, batch: int, samples: int, topologies) -> list[str]:
    per_sample = flops_per_sample(recipe)
    lo, hi = (f"{m:.0%}" for m in MFUS)
    lines = [
        f"Training FLOPs per sample: {per_sample / 1e9:.1f} GFLOP; global batch {batch}.",
        "",
        f"| topology | devices (hosts) | peak bf16 PFLOP/s | samples/s at {lo} / {hi} MFU "
        f"| step time at {lo} / {hi} | time for the samples at {lo} / {hi} |",
        "|---|---|---|---|---|---|",
    ]
    for label, kind, devices, hosts in topologies:
        peak = devices * PEAK_FLOPS[kind]
        rates = [peak * m / per_sample for m in MFUS]
        lines.append(
            f"| {label} | {devices} ({hosts}) | {peak / 1e15:.2f} | {rates[0]:,.0f} / {rates[1]:,.0f} "
            f"| {batch / rates[0]:.2f} s / {batch / rates[1]:.2f} s "
            f"| {_duration(samples / rates[0])} / {_duration(samples / rates[1])} |"
        )
    for label, _, devices, _ in topologies:  # a row the recipe does not run as it is: what to change
        if problem := refusal(recipe, batch, devices):
            lines += ["", *textwrap.wrap(f"On {label}, the recipe at batch {batch} is refused as it is: {problem}.",
                                         120, break_on_hyphens=False)]
    return lines


def markdown() -> str:
    out = []
    for title, recipe, batch, samples, what, topologies in EXAMPLES:
        out += [f"**{title}**, time for {what}:", ""]
        out += table(recipe, batch, samples, topologies)
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help; no options
    print(markdown(), end="")
