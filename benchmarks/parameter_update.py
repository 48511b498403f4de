"""The parameter update alone, at a preset's parameters: clipping by the global gradient norm, AdamW, and the skip of
a step whose gradient is not finite, as `clip_jax/train/step.py` runs them, against ways of writing it that move
less memory.

  python benchmarks/parameter_update.py --preset B/32

On the CPU the update is memory-bound: per step it need only read the gradient once for its norm, then read the
gradient, parameters and both moments and write back parameters and moments (8 passes over the parameters). Each
variant is one jitted function of (train state, gradients), the state donated as in the trainer, on random
gradients above the clipping norm; the variants take turns, round by round, and each reports the median of its
timed calls and its largest difference from the trainer's parameters after two updates. The reference is a copy of
one parameter-sized array (one read and one write), timed in the same rounds: the least traffic takes 4x its time.

Variants, each with optax's `clip_by_global_norm` and with a clip by one scalar factor (`scalar_clip`):
- `where` (the trainer's): the update, then `jnp.where(finite, new, old)` over parameters and moments;
- `cond`: the update inside `lax.cond(finite, ...)`;
- `unguarded`: no skip at all (open_clip's).

Results print and go to benchmarks/results/parameter_update_<preset>_<device>.json.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys
import time

from clip_jax.files import results_json
from clip_jax.host_memory import keep_freed_memory

keep_freed_memory()  # the trainer's allocator settings on the CPU (docs/benchmarks.md, item 2), before JAX starts

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from clip_jax.config import default_config  # noqa: E402
from clip_jax.methods import get_method  # noqa: E402
from clip_jax.models.presets import PRESETS, model_preset  # noqa: E402
from clip_jax.train import state as state_lib  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from machine import environment_facts  # noqa: E402
from result_files import checked_out_folder, count, new_result_path  # noqa: E402


def scalar_clip(max_norm: float) -> optax.GradientTransformation:
    """The gradients times min(1, max_norm / global norm). optax's `clip_by_global_norm` selects per element
    between the gradient and its scaled copy instead."""

    def update(updates, state, params=None):
        factor = jnp.minimum(1.0, max_norm / optax.tree.norm(updates))
        return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def optimizers(config, params) -> dict[str, optax.GradientTransformation]:
    """The trainer's optimizer (`state_lib.make_optimizer`: optax's clip, then AdamW), and the same AdamW after a
    clip by one scalar factor instead."""
    opt = config.optimizer
    unclipped = opt.copy_and_resolve_references()
    unclipped.grad_clip_norm = 0.0  # make_optimizer then clips nothing
    return {"optax_clip": state_lib.make_optimizer(opt, config.total_steps, params),
            "scalar_clip": optax.chain(scalar_clip(opt.grad_clip_norm),
                                       state_lib.make_optimizer(unclipped, config.total_steps, params))}


def parameter_shapes(config) -> dict:
    """The shapes and dtypes of the config's model parameters (nothing initialised)."""
    method = get_method(config)
    return nn.unbox(jax.eval_shape(method.model().init, jax.random.PRNGKey(0), *method.init_inputs())["params"])


def random_like(shapes: dict, seed: int) -> dict:
    """Standard normal arrays of these shapes: for timing and comparing updates, any values do."""
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    arrays = [jax.random.normal(key, x.shape, x.dtype) for key, x in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, arrays)


def guarded(tx, guard: str):
    """One update of the state by the gradients, the state donated, with `guard` for a non-finite gradient."""
    def step(state, grads):
        finite = jnp.isfinite(optax.tree.norm(grads))

        def update(params, opt_state):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        if guard == "cond":
            params, opt_state = jax.lax.cond(finite, update, lambda *kept: kept, state.params, state.opt_state)
        else:
            params, opt_state = update(state.params, state.opt_state)
            if guard == "where":
                keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
                params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state)

    return jax.jit(step, donate_argnums=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="B/32", choices=sorted(PRESETS))
    parser.add_argument("--rounds", type=count, default=3)
    parser.add_argument("--calls", type=count, default=4, help="timed calls per variant and round")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args()
    out = checked_out_folder(args.out)

    config = default_config()
    config.model = model_preset(args.preset)
    shapes = parameter_shapes(config)
    params, grads = random_like(shapes, seed=0), jax.tree.map(lambda g: g * 1e-3, random_like(shapes, seed=1))
    n_params = sum(leaf.size for leaf in jax.tree.leaves(params))
    print(f"{args.preset}: {n_params / 1e6:.1f}M parameters, gradient norm {float(optax.tree.norm(grads)):.2f} "
          f"(clipped to {config.optimizer.grad_clip_norm})")

    variants = {}
    for clip_name, tx in optimizers(config, params).items():
        for guard in ("where", "cond", "unguarded"):
            variants[f"{guard}+{clip_name}"] = (guarded(tx, guard), tx)
    copy = jax.jit(lambda x: x * 1.0001, donate_argnums=0)
    flat = jnp.ones((n_params,), jnp.float32)

    seconds, differences, trainers = collections.defaultdict(list), {}, None
    for round_ in range(args.rounds):
        for name, (update, tx) in variants.items():
            state = state_lib.init_state(jax.tree.map(jnp.copy, params), tx, jax.random.PRNGKey(0))
            for _ in range(2):  # also compiles
                state = update(state, grads)
            if round_ == 0:
                got = [np.asarray(leaf) for leaf in jax.tree.leaves(state.params)]
                trainers = trainers or got  # the first variant is the trainer's
                differences[name] = max(float(np.abs(g - w).max()) for g, w in zip(got, trainers, strict=True))
            for _ in range(args.calls):
                t0 = time.perf_counter()
                state = jax.block_until_ready(update(state, grads))
                seconds[name].append(time.perf_counter() - t0)
            del state  # one state at a time: B/32's is 1.8 GB
        flat = jax.block_until_ready(copy(flat))
        for _ in range(args.calls):
            t0 = time.perf_counter()
            flat = jax.block_until_ready(copy(flat))
            seconds["copy"].append(time.perf_counter() - t0)

    copy_s = float(np.median(seconds.pop("copy")))
    result = {
        "benchmark": "parameter_update", "date": time.strftime("%Y-%m-%d"),
        "machine": {**environment_facts(), "device_kind": jax.devices()[0].device_kind},
        "jax": jax.__version__, "optax": optax.__version__, "args": vars(args), "parameters": n_params,
        "copy_ms": copy_s * 1e3, "copy_gb_per_s": 2 * 4 * n_params / copy_s / 1e9,
        "least_traffic_ms": 4 * copy_s * 1e3,
        "variants": {name: {"ms": float(np.median(times)) * 1e3, "calls_ms": [t * 1e3 for t in times],
                            "max_difference_from_trainer": differences[name]}
                     for name, times in seconds.items()},
    }
    for name, facts in result["variants"].items():
        difference = facts["max_difference_from_trainer"]
        print(f"{name:24s} {facts['ms']:7.1f} ms   max difference from the trainer's {difference:.1e}")
    print(f"{'copy of the parameters':24s} {copy_s * 1e3:7.1f} ms ({result['copy_gb_per_s']:.0f} GB/s); "
          f"the least traffic would take {4 * copy_s * 1e3:.0f} ms")
    path = new_result_path(out / f"parameter_update_{args.preset.replace('/', '')}_{jax.devices()[0].platform}.json")
    path.write_text(results_json(result))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
