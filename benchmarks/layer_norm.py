"""LayerNorm forward + backward on this GPU: XLA's (`layers.layer_norm`, as `model.layer_norm="xla"` runs it) against
the Pallas (Triton) kernels of `model.layer_norm="pallas"` (`clip_jax/models/layer_norm_kernel.py`), at the
shapes of B/16's image tower (512 x 198 tokens x 768, padded for cuDNN) and text tower (512 x 78 x 512), in bf16.

  python benchmarks/layer_norm.py --out benchmarks/results

Each variant is one jitted function giving the output and the gradients of the input, scale and bias for a fixed
output gradient, timed as the median of 20 calls after 3 warm-up calls. Also reported: the bandwidth of the
least traffic the work needs (the forward reads x and writes y, the backward reads x and dy and writes dx: five
passes over a [rows, width] bf16 tensor) and the largest difference from XLA's results. Writes
`layer_norm_<device>_<date>.json`. Needs an NVIDIA GPU; elsewhere it says so and writes nothing.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from gpu_check import run_gpu_check

from clip_jax.models import layer_norm_kernel, layers

SHAPES = {"b16_image": (512, 198, 768), "b16_text": (512, 78, 512)}
# (rows a program forward, chunks of rows a program backward): the kernels' default first
KERNEL_VARIANTS = ((4, 32), (1, 128), (2, 64), (8, 16), (16, 8), (4, 8), (4, 128))


def timed(fn, *args, repeats: int = 20) -> float:
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        seconds.append(time.perf_counter() - t0)
    return float(np.median(seconds))


def forward_and_backward(norm):
    """(y, dx, dscale, dbias) of `norm(x, scale, bias)` for the output gradient dy, as one jitted function."""

    def run(x, scale, bias, dy):
        y, vjp = jax.vjp(norm, x, scale, bias)
        return (y, *vjp(dy))

    return jax.jit(run)


def measure(shape: tuple[int, ...]) -> dict:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
    dy = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
    scale, bias = (jnp.asarray(rng.normal(size=shape[-1:]), jnp.float32) for _ in range(2))
    least_bytes = 5 * x.size * x.dtype.itemsize
    xla = forward_and_backward(lambda x, s, b: layers.layer_norm(x, {"scale": s, "bias": b}).astype(jnp.bfloat16))
    want = [np.asarray(a, np.float32) for a in xla(x, scale, bias, dy)]
    results = {}
    variants = {"xla": xla} | {
        f"pallas_rows{rows}_chunks{chunks}": forward_and_backward(
            lambda x, s, b, rows=rows, chunks=chunks: layer_norm_kernel.layer_norm(x, s, b, 1e-5, jnp.bfloat16,
                                                                                   rows, chunks))
        for rows, chunks in KERNEL_VARIANTS}
    for name, fn in variants.items():
        try:
            seconds = timed(fn, x, scale, bias, dy)
            got = [np.asarray(a, np.float32) for a in fn(x, scale, bias, dy)]
            results[name] = {
                "ms": seconds * 1e3, "least_traffic_tb_per_s": least_bytes / seconds / 1e12,
                "max_relative_difference_from_xla": {
                    part: float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-30))
                    for part, g, w in zip(("y", "dx", "dscale", "dbias"), got, want, strict=True)},
            }
        except Exception as e:  # a tile Triton refuses fails alone
            results[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(name, json.dumps(results[name]), flush=True)
    return results


def main() -> None:
    run_gpu_check("layer_norm", __doc__, "the Pallas kernels need an NVIDIA GPU", SHAPES,
                  lambda shape: {"shape": shape, **measure(shape)})


if __name__ == "__main__":
    main()
