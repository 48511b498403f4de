"""Train-step throughput: step time, samples/s, TFLOP/s and MFU for a preset, batch and mesh; optionally the same
model and batch in open_clip (PyTorch) on the same machine.

  python benchmarks/train_step.py --preset tiny --batch 32
  python benchmarks/train_step.py --preset B/32 --batch 32 --open-clip
  python benchmarks/train_step.py --preset B/16 --batch 512 --dtype bfloat16 --remat dots   # on a GPU

Results are printed and saved as JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import socket
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.config import default_config
from clip_jax.methods import get_method
from clip_jax.methods.base import abstract_batch
from clip_jax.models import flops as flops_lib
from clip_jax.models.presets import PRESETS, model_preset
from clip_jax.sharding import batch_sharding, make_mesh
from clip_jax.train import state as state_lib
from clip_jax.train import step as step_lib
from clip_jax.train.checkpoint import abstract_like
from clip_jax.train.loop import create_state


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=PRESETS)
    p.add_argument("--batch", type=int, default=32, help="global batch")
    p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor sizes")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", default="none")
    p.add_argument("--scan", action="store_true", help="scan over layers")
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--open-clip", action="store_true", help="also time open_clip's same model (needs torch)")
    p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    return p.parse_args()


def time_clip_jax(args: argparse.Namespace) -> dict:
    config = default_config()
    config.batch_size = args.batch
    config.accum_steps = args.accum
    config.model = model_preset(args.preset)
    config.model.dtype = args.dtype
    config.model.remat_policy = args.remat
    config.model.scan_layers = args.scan
    config.mesh = dict(zip(("data", "fsdp", "tensor"), map(int, args.mesh.split(",")), strict=True))
    mesh = make_mesh(config.mesh.to_dict())
    method = get_method(config)
    model = method.model()
    init_fn, shardings, tx = create_state(config, method, model, mesh)
    state = init_fn(jax.random.PRNGKey(0))
    train_step = step_lib.make_train_step(
        method.step_fns(model), tx, state_lib.trainable_mask(state.params, ()),
        state_lib.learning_rate_schedule(config.optimizer, 1000), mesh, args.accum,
    )
    v, t = config.model.vision, config.model.text
    abstract_state = abstract_like(state)
    batch_spec = abstract_batch(method.fields(), args.batch, batch_sharding(mesh))
    t0 = time.perf_counter()
    compiled = step_lib.compile_train_step(train_step, shardings, abstract_state, batch_spec, mesh)
    compile_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, t.vocab_size - 1, size=(args.batch, t.context_length)).astype(np.int32)
    tokens[:, -1] = t.vocab_size - 1
    batch = jax.device_put(
        {"image": rng.integers(0, 256, (args.batch, v.image_size, v.image_size, 3), dtype=np.uint8), "text": tokens},
        batch_sharding(mesh),
    )
    for _ in range(2):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    flops = flops_lib.train_flops_per_sample(model.config) * args.batch
    peak = flops_lib.peak_flops_per_device(jax.devices()[0].device_kind)
    mem = compiled.memory_analysis()
    return {
        "step_time_s": step_s,
        "step_time_min_s": float(np.min(times)),
        "samples_per_s": args.batch / step_s,
        "tflops_per_s": flops / step_s / 1e12,
        "mfu": flops / step_s / (peak * mesh.size) if peak else None,
        "compile_s": compile_s,
        "temp_memory_gib_per_device": getattr(mem, "temp_size_in_bytes", 0) / 1024**3 if mem else None,
        "model_tflops_per_step": flops / 1e12,
        "mesh": dict(mesh.shape),
    }


def time_open_clip(args: argparse.Namespace) -> dict:
    """open_clip's CLIP of the same architecture, AdamW, same batch, on torch's default device (CPU here)."""
    import types

    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import open_clip
    import torch

    p = model_preset(args.preset)
    v, t = p["vision"], p["text"]
    model = open_clip.model.CLIP(
        embed_dim=p["embed_dim"],
        vision_cfg=open_clip.model.CLIPVisionCfg(
            layers=v["layers"], width=v["width"], head_width=v["head_dim"], patch_size=v["patch_size"],
            image_size=v["image_size"],
        ),
        text_cfg=open_clip.model.CLIPTextCfg(
            context_length=t["context_length"], vocab_size=t["vocab_size"], width=t["width"], heads=t["heads"],
            layers=t["layers"],
        ),
        quick_gelu=True,
        output_dict=True,
    )
    if args.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    loss_fn = open_clip.loss.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(args.batch, 3, v["image_size"], v["image_size"], dtype=next(model.parameters()).dtype)
    tokens = torch.randint(1, t["vocab_size"] - 1, (args.batch, t["context_length"]))
    tokens[:, -1] = t["vocab_size"] - 1

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(images, tokens)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    return {"step_time_s": step_s, "samples_per_s": args.batch / step_s, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def main() -> None:
    args = parse_args()
    device = jax.devices()[0]
    result = {
        "benchmark": "train_step",
        "date": datetime.date.today().isoformat(),
        "machine": {
            "host": socket.gethostname(),
            "processor": platform.processor() or platform.machine(),
            "device_kind": device.device_kind,
            "num_devices": jax.device_count(),
            "cpu_count": __import__("os").cpu_count(),
        },
        "jax": jax.__version__,
        "args": vars(args),
        "clip_jax": time_clip_jax(args),
    }
    if args.open_clip:
        result["open_clip"] = time_open_clip(args)
        result["speedup_vs_open_clip"] = result["open_clip"]["step_time_s"] / result["clip_jax"]["step_time_s"]
    print(json.dumps(result, indent=2))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"train_step_{args.preset.replace('/', '')}_{args.dtype}_b{args.batch}_{device.platform}.json"
    (out / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out / name}")


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing
    main()
