"""cuDNN's fused attention against XLA's, on this GPU, through the towers' own code: a `Transformer` stack in bf16 at
the shapes of B/16's image tower (197 tokens), the text tower (77, causal) and Long-CLIP's text (248, causal), with
each implementation, and in float32 with XLA's as the reference.

  python benchmarks/attention_parity.py --out benchmarks/results

For each shape: the largest difference of the stack's output and of every parameter's gradient from the float32
reference, relative to the reference's largest magnitude, for XLA's bf16 and cuDNN's bf16. cuDNN's path (an odd
sequence padded once, the padding masked out) is right if its errors are of the size of XLA's bf16 errors. Writes
`attention_parity_<device>_<date>.json`. Needs an NVIDIA GPU; elsewhere it says so and writes nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.models.layers import Transformer, cuda_compute_capability

# (name, tokens, causal): the towers whose attention the GPU runs measured.
SHAPES = [("b16_image", 197, False), ("text", 77, True), ("longclip_text", 248, True)]


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def compare(tokens: int, causal: bool, batch: int = 8, layers: int = 2) -> dict:
    def make(dtype, attention):
        return Transformer(num_layers=layers, num_heads=12, head_dim=64, mlp_dim=3072, activation="quick_gelu",
                           causal=causal, dtype=dtype, attention=attention)

    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, tokens, 768)), jnp.float32)
    params = make(jnp.float32, "xla").init(jax.random.PRNGKey(0), x)

    def run(dtype, attention):
        model = make(dtype, attention)
        loss = lambda p: jnp.sum(jnp.sin(model.apply(p, x).astype(jnp.float32)))
        out = jax.jit(lambda p: model.apply(p, x))(params)
        return out, jax.jit(jax.grad(loss))(params)

    with jax.default_matmul_precision("highest"):  # a GPU's float32 matmuls are TF32 by default, not a reference
        want_out, want_grads = run(jnp.float32, "xla")
    result = {}
    for attention in ("xla", "cudnn"):
        out, grads = run(jnp.bfloat16, attention)
        grad_errors = [relative_error(g, w) for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads),
                                                               strict=True)]
        result[f"{attention}_bf16"] = {"output": relative_error(out, want_out), "worst_gradient": max(grad_errors),
                                       "finite": bool(np.isfinite(np.asarray(out, np.float32)).all())}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = p.parse_args()
    if cuda_compute_capability() is None:
        print("attention_parity: cuDNN's attention needs an NVIDIA GPU; this machine runs on "
              f"{jax.default_backend()}: nothing measured")
        return
    device = jax.devices()[0]
    result = {"benchmark": "attention_parity", "date": datetime.date.today().isoformat(),
              "device_kind": device.device_kind, "jax": jax.__version__, "shapes": {}}
    for name, tokens, causal in SHAPES:
        result["shapes"][name] = {"tokens": tokens, "causal": causal, **compare(tokens, causal)}
        print(name, json.dumps(result["shapes"][name]), flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"attention_parity_{device.device_kind.replace(' ', '_')}_{result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
