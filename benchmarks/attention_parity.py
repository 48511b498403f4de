"""cuDNN's fused attention against XLA's, on this GPU, through the towers' own code: a `Transformer` stack in bf16 at
the shapes of B/16's image tower (197 tokens), the text tower (77, causal) and Long-CLIP's text (248, causal), and
RN50's attention pool (one query over 50 positions), with each implementation, and in float32 with XLA's as the
reference.

  python benchmarks/attention_parity.py --out benchmarks/results

For each shape: the largest difference of the module's output and of every parameter's gradient from the float32
reference, relative to the reference's largest magnitude (for a gradient, at least a thousandth of the largest of
all), for XLA's bf16 and cuDNN's bf16. cuDNN's path (an odd sequence padded once, the padding masked out) is right
if its errors are of the size of XLA's bf16 errors. Writes `attention_parity_<device>_<date>.json`. Needs an NVIDIA
GPU; elsewhere it says so and writes nothing.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from gpu_check import run_gpu_check

from clip_jax.models.layers import Transformer
from clip_jax.models.resnet import AttentionPool

BATCH = 8


def transformer(tokens: int, causal: bool, layers: int = 2):
    """A stack of the towers' blocks at B/16's width (12 heads of 64) and its input, `tokens` long."""

    def make(dtype, attention):
        return Transformer(num_layers=layers, num_heads=12, head_dim=64, mlp_dim=3072, activation="quick_gelu",
                           causal=causal, dtype=dtype, attention=attention)

    return make, (BATCH, tokens, 768)


def attention_pool():
    """RN50's attention pool: one query (the mean token) over 50 positions, 32 heads of 64."""
    return (lambda dtype, attention: AttentionPool(32, 1024, dtype, attention)), (BATCH, 49, 2048)


# name: (module factory (dtype, attention) -> module, input shape): the attention shapes the towers run.
CASES = {
    "b16_image": transformer(197, causal=False),
    "text": transformer(77, causal=True),
    "longclip_text": transformer(248, causal=True),
    "rn50_attention_pool": attention_pool(),
}


def relative_error(got, want, floor: float = 1e-30) -> float:
    """Largest difference relative to the reference's largest magnitude, or to `floor` if that is larger."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), floor))


def compare(make, shape: tuple[int, ...]) -> dict:
    """Errors of the bf16 module with XLA's and with cuDNN's attention against XLA's float32: its output and the
    worst of its parameters' gradients, each relative to the reference's largest magnitude."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    params = make(jnp.float32, "xla").init(jax.random.PRNGKey(0), x)

    def run(dtype, attention):
        model = make(dtype, attention)
        first = lambda p: jax.tree.leaves(model.apply(p, x))[0]  # the pool returns (pooled, features)
        loss = lambda p: jnp.sum(jnp.sin(first(p).astype(jnp.float32)))
        return jax.jit(first)(params), jax.jit(jax.grad(loss))(params)

    with jax.default_matmul_precision("highest"):  # a GPU's float32 matmuls are TF32 by default, not a reference
        want_out, want_grads = run(jnp.float32, "xla")
    result = {}
    for attention in ("xla", "cudnn"):
        out, grads = run(jnp.bfloat16, attention)
        # A gradient that is zero in exact arithmetic (the key bias's: softmax ignores a shift shared by all keys)
        # is measured against a thousandth of the largest gradient instead of its own rounding noise.
        floor = 1e-3 * max(float(np.abs(np.asarray(w)).max()) for w in jax.tree.leaves(want_grads))
        grad_errors = [relative_error(g, w, floor) for g, w in zip(jax.tree.leaves(grads),
                                                                   jax.tree.leaves(want_grads), strict=True)]
        result[f"{attention}_bf16"] = {"output": relative_error(out, want_out), "worst_gradient": max(grad_errors),
                                       "finite": bool(np.isfinite(np.asarray(out, np.float32)).all())}
    return result


def main() -> None:
    # Before the backend starts: no GEMM autotuning, which compared numerics do not need (on 2026-12-04's H200 the
    # autotuned compiles let two of the four shapes finish in four minutes).
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_autotune_level=0".strip()
    run_gpu_check("attention_parity", __doc__, "cuDNN's attention needs an NVIDIA GPU", CASES,
                  lambda case: {"input_shape": case[1], **compare(*case)})


if __name__ == "__main__":
    main()
