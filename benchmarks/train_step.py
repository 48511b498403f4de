"""Train-step throughput: step time, samples/s, TFLOP/s, the fraction of the matmul peak measured in the same run,
MFU against the vendor peak where known; optionally open_clip's same model and batch timed in the same run, in a
process of its own, the two taking turns step by step (a load from other jobs slows both alike), and an XLA per-op
profile of one step.

  python benchmarks/train_step.py --preset B/32 --batch 32 --open-clip --profile                 # CPU
  python benchmarks/train_step.py --preset tiny --image-size 96 --context-length 24 --vocab-size 1024 \
      --batch 128 --open-clip --profile                                                         # the demo's shapes
  python benchmarks/train_step.py --preset B/16 --batch 512 --dtype bfloat16 --remat dots --scan   # on a GPU

Results are printed and saved as JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import multiprocessing
import multiprocessing.connection
import os
import pathlib
import platform
import re
import socket
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.config import default_config
from clip_jax.host_memory import keep_freed_memory
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
    p.add_argument("--image-size", type=int, help="override the preset's image size")
    p.add_argument("--context-length", type=int, help="override the preset's text context")
    p.add_argument("--vocab-size", type=int, help="override the preset's vocabulary size")
    p.add_argument("--batch", type=int, default=32, help="global batch")
    p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor sizes")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", default="none")
    p.add_argument("--scan", action="store_true", help="scan over layers")
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--open-clip", action="store_true",
                   help="also time open_clip's same model (needs torch) in a process of its own, taking turns "
                        "with ours step by step")
    p.add_argument("--profile", action="store_true", help="XLA per-op profile of one step: time by kind, top ops")
    p.add_argument("--malloc", default="keep", choices=["keep", "default"],
                   help="keep: both trainers' processes keep freed memory for the next step (what clip-jax sets on "
                        "the CPU, clip_jax/host_memory.py); default: glibc's own settings (how open_clip runs)")
    p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    return p.parse_args()


def preset(args: argparse.Namespace) -> dict:
    """The model config of `args.preset` with the command line's size overrides (both frameworks build it)."""
    model = model_preset(args.preset, **({"vocab_size": args.vocab_size} if args.vocab_size else {}),
                         **({"context_length": args.context_length} if args.context_length else {}))
    if args.image_size:
        model["vision"]["image_size"] = args.image_size
    model.update(dtype=args.dtype, remat_policy=args.remat, scan_layers=args.scan)
    return model


def synthetic_batch(model: dict, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images [B, H, W, 3] and tokens [B, T] ending in EOT (the largest id)."""
    rng = np.random.default_rng(0)
    size, text = model["vision"]["image_size"], model["text"]
    tokens = rng.integers(1, text["vocab_size"] - 1, size=(batch, text["context_length"])).astype(np.int32)
    tokens[:, -1] = text["vocab_size"] - 1
    return rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8), tokens


def build_clip_jax(args: argparse.Namespace) -> tuple[Callable[[], None], dict, str]:
    """(one train step, run to completion; facts of the compiled step; its optimised HLO text)."""
    config = default_config()
    config.batch_size = args.batch
    config.accum_steps = args.accum
    config.model = preset(args)
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
    batch_spec = abstract_batch(method.fields(), args.batch, batch_sharding(mesh))
    t0 = time.perf_counter()
    compiled = step_lib.compile_train_step(train_step, shardings, abstract_like(state), batch_spec, mesh)
    compile_s = time.perf_counter() - t0
    images, tokens = synthetic_batch(config.model.to_dict(), args.batch)
    batch = jax.device_put({"image": images, "text": tokens}, batch_sharding(mesh))

    def step() -> None:
        nonlocal state
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)

    mem = compiled.memory_analysis()
    facts = {
        "compile_s": compile_s,
        "temp_memory_gib_per_device": getattr(mem, "temp_size_in_bytes", 0) / 1024**3 if mem else None,
        "model_tflops_per_step": flops_lib.train_flops_per_sample(model.config) * args.batch / 1e12,
        "mesh": dict(mesh.shape),
    }
    return step, facts, compiled.as_text()


def build_open_clip(args: argparse.Namespace) -> tuple[Callable[[], None], dict]:
    """open_clip's CLIP of the same architecture, its ClipLoss and torch AdamW, same batch, on torch's default
    device (the CPU here), with torch's default threads (one per core)."""
    import types

    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import open_clip
    import torch

    p = preset(args)
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
    images, tokens = synthetic_batch(p, args.batch)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).to(next(model.parameters()).dtype) / 255
    tokens = torch.from_numpy(tokens).long()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(images, tokens)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        opt.step()

    return step, {"torch": torch.__version__, "threads": torch.get_num_threads()}


def _serve_open_clip(args: argparse.Namespace, conn: multiprocessing.connection.Connection) -> None:
    """The open_clip process: builds the model, then runs one step per request until told to stop."""
    if args.malloc == "keep":
        keep_freed_memory()  # torch's CPU allocator maps and faults in its big buffers afresh just the same
    step, facts = build_open_clip(args)
    conn.send(facts)
    while conn.recv() == "step":
        step()
        conn.send(None)


def open_clip_in_process(args: argparse.Namespace) -> tuple[Callable[[], None], dict, Callable[[], None]]:
    """open_clip in a process of its own, stepped on request: (step, facts, stop). Each trainer runs alone in
    practice, with its own heap, allocator settings and thread pools; the two still take turns step by step."""
    ctx = multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=_serve_open_clip, args=(args, child_conn), daemon=True)
    child.start()
    facts = conn.recv()

    def step() -> None:
        conn.send("step")
        conn.recv()

    def stop() -> None:
        conn.send("stop")
        child.join()

    return step, facts, stop


def interleaved_times(steps: dict[str, Callable[[], None]], count: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per step of each contender, taking turns step by step after `warmup` untimed steps each."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(count):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def matmul_peak(dtype: str, sizes: tuple[int, ...] = (1024, 2048, 4096), repeats: int = 5) -> dict:
    """The best FLOP/s of one square matmul through JAX on the first device, per size: the machine's practical
    matmul peak, measured in the same run as the step (on a shared CPU, a vendor peak means little)."""
    rates = {}
    for n in sizes:
        a = jnp.ones((n, n), dtype)
        matmul = jax.jit(lambda x, y: x @ y)
        matmul(a, a).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            matmul(a, a).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        rates[n] = 2 * n**3 / best / 1e12
    return {"tflops_per_s_by_size": rates, "peak_tflops_per_s": max(rates.values())}


def op_kinds(hlo: str) -> dict[str, str]:
    """Kind of each instruction of the optimised HLO that can show as an op in a profile: `matmul` (a dot,
    convolution or library call inside), `layout` (only copies, transposes, bitcasts), `reduction`, `elementwise`;
    with the JAX op name (`op_name` metadata) it came from."""
    computations = {m.group(1): m.group(2) for m in re.finditer(r"\n%([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S)}
    kinds = {}
    for m in re.finditer(r"%([\w.\-]+) = \S+ (\w[\w-]*)\(([^\n]*)", hlo):
        name, opcode, rest = m.groups()
        body = rest
        called = re.search(r"calls=%([\w.\-]+)", rest)
        if called:
            body = computations.get(called.group(1), "")
        ops = set(re.findall(r"= \S+ (\w[\w-]*)\(", body)) | {opcode}
        if ops & {"dot", "convolution", "custom-call"}:
            kind = "matmul"
        elif ops <= {"fusion", "copy", "transpose", "bitcast", "parameter", "reshape", "broadcast"}:
            kind = "layout"
        elif "reduce" in ops:
            kind = "reduction"
        else:
            kind = "elementwise"
        # A fusion is named after its root (its result), e.g. a parameter update after the AdamW step's last op.
        root = re.search(r"ROOT [^\n]*", body)
        op_name = re.search(r'op_name="([^"]+)"', root.group(0) if root else rest) or re.search(
            r'op_name="([^"]+)"', body)
        kinds[name] = (kind, re.sub(r"resblocks_\d+", "resblocks_N", op_name.group(1)) if op_name else "")
    return kinds


def profile_step(step: Callable[[], None], hlo: str, top: int = 12) -> dict:
    """Time by op kind and the costliest ops of one step, from a jax.profiler trace. Ops on the CPU run on the
    XLA thread pool, some concurrently, so the op times can sum to more than the step."""
    from jax.profiler import ProfileData

    kinds = op_kinds(hlo)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        t0 = time.perf_counter()
        step()
        step_s = time.perf_counter() - t0
        jax.profiler.stop_trace()
        data = ProfileData.from_file(str(next(pathlib.Path(trace_dir).rglob("*.xplane.pb"))))
    by_kind, by_op = collections.Counter(), collections.Counter()
    for plane in data.planes:
        on_device = plane.name.startswith("/device:")  # a GPU's ops; a CPU's run on the host's XLA threads
        for line in plane.lines:
            if (line.name != "XLA Ops") if on_device else ("XLAEigen" not in line.name):
                continue
            for event in line.events:
                if event.name in kinds:
                    kind, op_name = kinds[event.name]
                    by_kind[kind] += event.duration_ns / 1e9
                    by_op[(kind, op_name)] += event.duration_ns / 1e9
    total = sum(by_kind.values())
    return {
        "step_s": step_s,
        "op_seconds": total,
        "share_by_kind": {k: v / total for k, v in by_kind.most_common()} if total else {},
        "top_ops": [{"kind": k, "op_name": name, "seconds": v} for (k, name), v in by_op.most_common(top)],
    }


def main() -> None:
    args = parse_args()
    # as clip-jax does on the CPU (clip_jax/host_memory.py); before JAX starts
    kept_freed_memory = args.malloc == "keep" and keep_freed_memory()
    jnp.zeros(())  # initialise the backend before timing
    device = jax.devices()[0]
    steps, facts, hlo = {}, {}, ""
    steps["clip_jax"], facts["clip_jax"], hlo = build_clip_jax(args)
    if args.open_clip:
        steps["open_clip"], facts["open_clip"], stop_open_clip = open_clip_in_process(args)
    times = interleaved_times(steps, args.steps)
    if args.open_clip:
        stop_open_clip()
    peak = matmul_peak(args.dtype)
    result = {
        "benchmark": "train_step",
        "date": datetime.date.today().isoformat(),
        "machine": {
            "host": socket.gethostname(),
            "processor": platform.processor() or platform.machine(),
            "device_kind": device.device_kind,
            "num_devices": jax.device_count(),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "jax": jax.__version__,
        "args": vars(args),
        "kept_freed_memory": kept_freed_memory,
        "matmul": peak,
    }
    tflop = facts["clip_jax"]["model_tflops_per_step"]
    vendor_peak = flops_lib.peak_flops_per_device(device.device_kind)
    for name, seconds in times.items():
        step_s = float(np.median(seconds))
        result[name] = {"step_time_s": step_s, "step_times_s": seconds, "samples_per_s": args.batch / step_s,
                        "tflops_per_s": tflop / step_s, **facts[name]}
    ours = result["clip_jax"]
    ours["fraction_of_matmul_peak"] = ours["tflops_per_s"] / (peak["peak_tflops_per_s"] * jax.device_count())
    ours["mfu"] = ours["tflops_per_s"] * 1e12 / (vendor_peak * jax.device_count()) if vendor_peak else None
    if args.open_clip:
        result["speedup_vs_open_clip"] = result["open_clip"]["step_time_s"] / ours["step_time_s"]
    if args.profile:
        result["profile"] = profile_step(steps["clip_jax"], hlo)
    print(json.dumps(result, indent=2))
    print(f"clip_jax {ours['step_time_s']:.3f} s/step, {ours['tflops_per_s']:.3f} TFLOP/s = "
          f"{ours['fraction_of_matmul_peak']:.0%} of the {peak['peak_tflops_per_s']:.3f} TFLOP/s matmul peak"
          + (f"; open_clip {result['open_clip']['step_time_s']:.3f} s/step: {result['speedup_vs_open_clip']:.2f}x"
             if args.open_clip else ""))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = "".join(f"_{k}{getattr(args, a)}" for k, a in (("px", "image_size"), ("ctx", "context_length"))
                    if getattr(args, a))
    name = (f"train_step_{args.preset.replace('/', '')}{shape}_{args.dtype}_b{args.batch}"
            f"{'_scan' if args.scan else ''}_{device.platform}.json")
    (out / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out / name}")


if __name__ == "__main__":
    main()
