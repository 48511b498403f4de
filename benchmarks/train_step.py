r"""Train-step throughput: step time, samples/s, TFLOP/s, the fraction of the matmul peak measured in the same run,
MFU against the vendor peak where known; optionally open_clip's same model and batch timed in the same run, in a
process of its own, the two taking turns step by step (a load from other jobs slows both alike), and an XLA per-op
profile of one step.

  python benchmarks/train_step.py --preset B/32 --batch 32 --open-clip --profile                 # CPU
  python benchmarks/train_step.py --preset tiny --image-size 96 --context-length 24 --vocab-size 1024 \
      --batch 128 --open-clip --profile                                                         # the demo's shapes
  python benchmarks/train_step.py --preset B/16 --batch 512 --dtype bfloat16 --remat dots --scan   # on a GPU
  python benchmarks/train_step.py --config configs/longclip_l14.py --batch 256 --scan             # a recipe's step
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/train_step.py --preset B/16 --scan \
      --batch 256 --mesh 2,4,1 --compile-only              # memory and collectives per device on a mesh, untimed

A recipe (`--config`) is timed with its own method, model, frozen parameters and optimizer, the arrays its method
prepares, and a batch of its data where that is generated (`shapes`; else random, as for a preset); `--batch`,
`--dtype`, `--remat`, `--scan`/`--no-scan`, `--mesh` and `--accum` override it where given (its own mesh and
accumulation otherwise). The mesh and batch are checked as the trainer checks them. `--compile-only` reports the
compiled step's memory per device as the trainer prints it at launch (arguments: the state and the batch; outputs;
temporaries; aliased). benchmarks/gpu_suite.py runs the GPU measurements in one command.

Results are printed and saved as JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gzip
import importlib.metadata
import importlib.util
import itertools
import json
import multiprocessing
import multiprocessing.connection
import pathlib
import re
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import hlo as hlo_lib
from clip_jax.config import check_devices, default_config, load_config, validate
from clip_jax.data.pipeline import make_tokenizer
from clip_jax.errors import ConfigError
from clip_jax.files import results_json
from clip_jax.host_memory import dispatch_depth, keep_freed_memory
from clip_jax.methods import get_method
from clip_jax.methods.base import Field, abstract_batch
from clip_jax.models import flops as flops_lib
from clip_jax.models.layers import (
    ATTENTION_IMPLEMENTATIONS,
    LAYER_NORM_IMPLEMENTATIONS,
    resolved_attention,
    resolved_layer_norm,
)
from clip_jax.models.presets import PRESETS, model_preset
from clip_jax.sharding import batch_sharding, make_mesh
from clip_jax.train import state as state_lib
from clip_jax.train import step as step_lib
from clip_jax.train.loop import (
    abstract_train_state,
    check_gpu_implementations,
    create_state,
    preparation,
    unsplit_by_tensor,
)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # machine.py beside it, also when a test loads it
from machine import environment_facts  # noqa: E402
from result_files import checked_out_folder, count, new_result_path, new_result_stem  # noqa: E402

DEFAULT_BATCH = 32  # a preset's global batch unless --batch says otherwise


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="time this recipe's step (path/to/config.py[:arg]) instead of --preset's CLIP")
    p.add_argument("--preset", default="tiny", choices=PRESETS, help="the model preset (default: tiny)")
    p.add_argument("--image-size", type=count, help="override the preset's image size")
    p.add_argument("--context-length", type=count, help="override the preset's text context")
    p.add_argument("--vocab-size", type=count, help="override the preset's vocabulary size")
    p.add_argument("--batch", type=count, help=f"global batch (default: the recipe's, else {DEFAULT_BATCH})")
    p.add_argument("--mesh", type=mesh_sizes, help="data,fsdp,tensor sizes, -1 for the rest (default: the recipe's, "
                   "else -1,1,1)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: the recipe's, else "
                   "float32)")
    p.add_argument("--remat", help="remat policy (default: the recipe's, else none)")
    p.add_argument("--scan", action=argparse.BooleanOptionalAction,
                   help="scan over layers (default: the recipe's, else not)")
    p.add_argument("--attention", choices=ATTENTION_IMPLEMENTATIONS,
                   help="the towers' self-attention, model.attention (default: the recipe's, else auto: cuDNN's "
                        "fused attention on a GPU in bfloat16, XLA's otherwise)")
    p.add_argument("--layer-norm", choices=LAYER_NORM_IMPLEMENTATIONS,
                   help="model.layer_norm (default: the recipe's, else auto: the Pallas (Triton) kernels on a Hopper "
                        "GPU, XLA's otherwise)")
    p.add_argument("--patch-dropout", type=float,
                   help="fraction of patch tokens each training image drops (model.vision.patch_dropout; open_clip's "
                        "patch_dropout with --open-clip); default: the recipe's, else 0")
    p.add_argument("--accum", type=count, help="gradient accumulation steps (default: the recipe's, else 1)")
    p.add_argument("--steps", type=count, default=10, help="timed steps, after 2 warm-up steps (default: 10)")
    p.add_argument("--open-clip", action="store_true",
                   help="also time open_clip's same model (needs torch) in a process of its own, taking turns "
                        "with ours step by step")
    p.add_argument("--compile-only", action="store_true",
                   help="compile the step and report what XLA says of it (temp memory per device, the collectives' "
                        "traffic per device, compile time) without timing it: e.g. a pod's mesh on fake CPU devices "
                        "(XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    p.add_argument("--profile", action="store_true", help="XLA per-op profile of one step: time by kind, top ops")
    p.add_argument("--keep-profile", metavar="DIR",
                   help="with --profile, also keep the step's trace (.xplane.pb.gz, for TensorBoard or xprof once "
                        "unzipped) and its optimised HLO (.hlo.txt.gz) in DIR, named like the JSON")
    p.add_argument("--read-profile", metavar="STEM",
                   help="print the profile summary of a kept trace (STEM: its path without .xplane.pb.gz) and exit")
    p.add_argument("--malloc", default="keep", choices=["keep", "default"],
                   help="keep: both trainers' processes keep freed memory for the next step (what clip-jax sets on "
                        "the CPU, clip_jax/host_memory.py); default: glibc's own settings (how open_clip runs)")
    p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"),
                   help="folder of the JSON (named after the run; an earlier run's is never replaced: _2, _3...)")
    args = p.parse_args()
    if args.config and (args.open_clip or args.image_size or args.context_length or args.vocab_size):
        p.error("--config times a recipe as it is: --open-clip and the size overrides go with --preset")
    if args.compile_only and (args.open_clip or args.profile):
        p.error("--compile-only times nothing: --open-clip and --profile go without it")
    if args.open_clip and args.preset.startswith("RN"):
        p.error(f"--open-clip builds open_clip's ViT CLIPs only; time --preset {args.preset} without it")
    return args


def preset(args: argparse.Namespace) -> dict:
    """The model config of `args.preset` with the command line's size overrides (both frameworks build it)."""
    model = model_preset(args.preset, **({"vocab_size": args.vocab_size} if args.vocab_size else {}),
                         **({"context_length": args.context_length} if args.context_length else {}))
    if args.image_size:
        model["vision"]["image_size"] = args.image_size
    if args.patch_dropout is not None:  # a ViT's setting: a ResNet tower has none
        model["vision"]["patch_dropout"] = args.patch_dropout
    model.update(dtype=args.dtype or "float32", remat_policy=args.remat or "none", scan_layers=bool(args.scan),
                 attention=args.attention or "auto", layer_norm=args.layer_norm or "auto")
    return model


def benchmark_config(args: argparse.Namespace):
    """The timed run's config: the recipe of `--config` or CLIP with `--preset`'s model, the command line's
    batch, dtype, remat and scan on top."""
    if args.config:
        config = load_config(args.config)
        config.model.scan_layers = config.model.scan_layers if args.scan is None else args.scan
        config.model.dtype = args.dtype or config.model.dtype
        config.model.remat_policy = args.remat or config.model.remat_policy
        config.model.attention = args.attention or config.model.attention
        config.model.layer_norm = args.layer_norm or config.model.layer_norm
        if args.patch_dropout is not None:
            config.model.vision.patch_dropout = args.patch_dropout
    else:
        config = default_config()
        config.model = preset(args)
    # A recipe keeps its own mesh and accumulation unless the command line gives them (they were replaced by pure
    # data parallelism without a word: a compile-only plan of an FSDP recipe measured another sharding).
    config.batch_size = args.batch or (config.batch_size if args.config else DEFAULT_BATCH)
    config.accum_steps = args.accum or (config.accum_steps if args.config else 1)
    if args.mesh or not args.config:
        config.mesh = dict(zip(("data", "fsdp", "tensor"), args.mesh or (-1, 1, 1), strict=True))
    validate(config)  # the overrides too: e.g. cudnn attention on a float32 recipe is one line
    sizes = check_devices(config, jax.device_count())  # as the trainer: a mesh that does not fit, a batch it does not
    if unsplit := unsplit_by_tensor(config, sizes["tensor"]):  # divide; and its warning of heads left whole
        print(f"warning: {unsplit}", file=sys.stderr)
    return config


def mesh_sizes(text: str) -> tuple[int, int, int]:
    """argparse type of --mesh: three integers, data,fsdp,tensor."""
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3:
        raise argparse.ArgumentTypeError(f"expected data,fsdp,tensor: three integers (-1 for the rest), not {text!r}")
    return sizes


def synthetic_batch(fields: dict[str, Field], batch: int, vocab_size: int) -> dict[str, np.ndarray]:
    """A random batch of the method's fields, for timing: uint8 [H, W, 3] arrays (images) uniform over 0-255, integer
    rows [B, T] (tokens) of random ids ending in EOT (the largest id), integer scalars (labels) and other uint8 arrays
    (label maps: LSeg's classes per pixel) 0, float arrays (waveforms) uniform in [-1, 1]."""
    rng = np.random.default_rng(0)
    arrays = {}
    for name, field in fields.items():
        shape = (batch, *field.shape)
        if field.dtype == np.uint8 and len(field.shape) == 3:
            arrays[name] = rng.integers(0, 256, shape, dtype=np.uint8)
        elif field.dtype == np.uint8 or (np.issubdtype(field.dtype, np.integer) and not field.shape):
            arrays[name] = np.zeros(shape, field.dtype)
        elif np.issubdtype(field.dtype, np.integer):
            tokens = rng.integers(1, vocab_size - 1, size=shape).astype(field.dtype)
            tokens[..., -1] = vocab_size - 1
            arrays[name] = tokens
        else:
            arrays[name] = rng.uniform(-1, 1, shape).astype(field.dtype)
    return arrays


def build_clip_jax(args: argparse.Namespace, config) -> tuple[Callable[[], None], dict, str]:
    """(one train step of `config` (`benchmark_config`), run to completion; facts of the compiled step; its optimised
    HLO text)."""
    mesh = make_mesh(config.mesh.to_dict())
    method = get_method(config)
    method.check(mesh)
    model = method.model()
    host_batch = None
    if args.config:
        # A recipe's method may make arrays from the model before training (LSeg's and the detectors' label
        # embeddings, the few-shot methods' features): made here from the initial parameters, in a scratch workdir
        # (their values do not change the step's time; CLIP's preparation is none and builds nothing). A timed step
        # of a recipe on generated data (`shapes`) runs on a batch of it: label maps and boxes that random arrays are
        # not (a detector's loss on random boxes is not finite, and every step would skip its update).
        with tempfile.TemporaryDirectory() as scratch:
            tokenizer = make_tokenizer(config, pathlib.Path(scratch), new_run=True)
            method.prepare(preparation(config, method, mesh, pathlib.Path(scratch), tokenizer, (None, None),
                                       jax.random.PRNGKey(0), training=True))
            if not args.compile_only and config.data.source == "shapes":
                config.data.workers = 0
                host_batch = {k: v for k, v in next(method.train_data(config, tokenizer, range(config.batch_size)))
                              .items() if k != "stats"}
    init_fn, shardings, tx = create_state(config, method, model, mesh)
    abstract_state = abstract_train_state(init_fn, shardings)
    trainable = state_lib.trainable_mask(abstract_state.params, config.optimizer.frozen)
    train_step = step_lib.make_train_step(
        method.step_fns(model), tx, trainable,
        state_lib.learning_rate_schedule(config.optimizer, config.total_steps), mesh, config.accum_steps,
    )
    batch_spec = abstract_batch(method.fields(), config.batch_size, batch_sharding(mesh))
    t0 = time.perf_counter()
    compiled = step_lib.compile_train_step(train_step, shardings, abstract_state, batch_spec, mesh)
    compile_s = time.perf_counter() - t0
    print(f"compiled clip_jax's step in {compile_s:.1f} s", flush=True)  # a large model's compile takes minutes
    # The state and a batch exist only for a timed run: --compile-only of a pod's model on fake CPU devices holds
    # neither in this machine's memory.
    state = batch = None
    if not args.compile_only:
        state = init_fn(jax.random.PRNGKey(0))
        if host_batch is None:
            host_batch = synthetic_batch(method.fields(), config.batch_size, config.model.text.vocab_size)
        batch = jax.device_put(host_batch, batch_sharding(mesh))

    step_metrics = {"loss": [], "nonfinite": []}  # on the device until read, so reading costs no step time

    def step(wait: bool = True) -> dict:
        """One step; with `wait` False it returns once dispatched, as the trainer's steps do (see pipelined_times).
        Returns the step's metrics (on the device)."""
        nonlocal state
        state, metrics = compiled(state, batch)
        if wait:
            jax.block_until_ready(metrics)
        for key, values in step_metrics.items():
            values.append(metrics[key])
        return metrics

    mem = compiled.memory_analysis()
    # (the trainer prints the same four at launch: the parameters and optimizer state are the arguments, which
    # replication on a data-only mesh multiplies)
    memory = {f"{kind}_memory_gib_per_device": getattr(mem, f"{kind}_size_in_bytes", 0) / 1024**3 if mem else None
              for kind in ("argument", "output", "temp", "alias")}
    facts = {
        "compile_s": compile_s,
        **memory,
        # the trainer's own count (its MFU in the logs): the method's towers, frozen ones at one forward
        "model_tflops_per_step": method.flops_per_example(trainable) * config.batch_size / 1e12,
        "mesh": dict(mesh.shape),
        "batch": config.batch_size,
        "accum_steps": config.accum_steps,
        "method": config.method.name,
        "model": {**{k: config.model[k] for k in ("dtype", "remat_policy", "scan_layers")},
                  "layer_norm": resolved_layer_norm(config.model.layer_norm),  # "auto" as it ran here
                  # per tower: cuDNN's refuses some head dims, and "auto" then takes XLA's
                  "attention": {tower: resolved_attention(config.model.attention, config.model.dtype,
                                                          config.model[tower].get("head_dim"))
                                for tower in ("vision", "text") if tower in config.model},
                  "patch_dropout": config.model.vision.get("patch_dropout", 0.0)},
        "step_metrics": step_metrics,
    }
    hlo = compiled.as_text()
    facts["collectives_per_device"] = hlo_lib.collective_traffic(hlo)
    return step, facts, hlo


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
            image_size=v["image_size"], patch_dropout=v.get("patch_dropout", 0.0),
        ),
        text_cfg=open_clip.model.CLIPTextCfg(
            context_length=t["context_length"], vocab_size=t["vocab_size"], width=t["width"], heads=t["heads"],
            layers=t["layers"],
        ),
        quick_gelu=True,
        output_dict=True,
    )
    if p["dtype"] == "bfloat16":
        model = model.to(torch.bfloat16)
    loss_fn = open_clip.loss.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = synthetic_batch({"image": Field((v["image_size"], v["image_size"], 3), np.uint8),
                             "text": Field((t["context_length"],), np.int32)}, args.batch or DEFAULT_BATCH,
                            t["vocab_size"])
    images, tokens = batch["image"], batch["text"]
    images = torch.from_numpy(images).permute(0, 3, 1, 2).to(next(model.parameters()).dtype) / 255
    tokens = torch.from_numpy(tokens).long()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(images, tokens)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        opt.step()

    return step, {"torch": torch.__version__, "threads": torch.get_num_threads()}


def torch_matmul_peak(dtype: str, repeats: int = 5) -> dict:
    """`matmul_peak`'s measurement through torch on the CPU, with the threads open_clip's step has: how fast the
    library under open_clip multiplies matrices on this machine, which differs from JAX's by machine."""
    import torch

    def product(n: int) -> Callable[[], None]:
        a = torch.randn(n, n, generator=torch.Generator().manual_seed(n)).to(getattr(torch, dtype))
        return lambda: a @ a  # synchronous on the CPU

    return peak_rates(product, (1024, 2048, 4096), repeats)


OPEN_CLIP_MISSING = "open_clip is not installed (pip install open_clip_torch): it is what --open-clip compares with"
# How long the parent waits between checks that open_clip's process still runs (a step can take minutes: no limit
# on the wait itself, only on noticing a process that died).
CHILD_POLL_S = 1.0


def _serve_open_clip(args: argparse.Namespace, conn: multiprocessing.connection.Connection) -> None:
    """The open_clip process: builds the model, then runs one step per "step" request and answers a "matmul"
    request with torch's matmul peak, until told to stop. Every answer is ("ok", value); a failure is answered
    ("failed", its last line) before the process exits, so that the parent can name it."""
    try:
        if args.malloc == "keep":
            keep_freed_memory()  # torch's CPU allocator maps and faults in its big buffers afresh just the same
        step, facts = build_open_clip(args)
        conn.send(("ok", facts))
        while (request := conn.recv()) in ("step", "matmul"):
            conn.send(("ok", step() if request == "step" else torch_matmul_peak(preset(args)["dtype"])))
    except Exception as e:
        missing = isinstance(e, ModuleNotFoundError) and e.name in ("open_clip", "torch")
        conn.send(("failed", OPEN_CLIP_MISSING if missing else f"{type(e).__name__}: {e}".strip().splitlines()[-1]))
        sys.exit(1)  # the parent prints the one line; a traceback here would bury it


def open_clip_in_process(args: argparse.Namespace, serve: Callable = _serve_open_clip
                         ) -> tuple[Callable[[], None], dict, Callable[[], dict], Callable[[], None]]:
    """open_clip in a process of its own, stepped on request: (step, facts, matmul_peak, stop). Each trainer runs
    alone in practice, with its own heap, allocator settings and thread pools; the two still take turns step by
    step. `serve` runs in that process (`_serve_open_clip`; a test's stand-in). Where the process fails or dies (an
    import error, the OOM killer), this one exits with one line saying so instead of waiting for its answer."""
    ctx = multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=serve, args=(args, child_conn), daemon=True)
    child.start()
    child_conn.close()  # the child's end lives on in the child alone: its death then ends the pipe (EOFError)

    def answer() -> object:
        """The child's next answer; exits naming the child's failure where it fails or dies instead."""
        while not conn.poll(CHILD_POLL_S):
            if not child.is_alive():
                break
        failure = "it died without a word"
        try:
            if conn.poll(0):
                status, value = conn.recv()
                if status == "ok":
                    return value
                failure = value
        except (EOFError, OSError):
            pass
        child.join(10)
        sys.exit(f"open_clip's step failed in its process (exit code {child.exitcode}): {failure}")

    def ask(request: str) -> object:
        try:
            conn.send(request)
        except OSError:  # the child is gone (a broken pipe): answer() names how it ended
            pass
        return answer()

    def step() -> None:
        ask("step")

    def matmul_peak() -> dict:
        return ask("matmul")

    def stop() -> None:
        conn.send("stop")
        child.join()

    facts = answer()
    return step, facts, matmul_peak, stop


def interleaved_times(steps: dict[str, Callable[[], None]], count: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per step of each contender, taking turns step by step after `warmup` untimed steps each; which one
    goes first alternates from one round to the next (as tokenizer.py's batches do), so neither always runs right
    after the other's cache-cold or thread-busy moment. Prints a short line per round: a large model's run would
    otherwise say nothing for minutes."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    order = list(steps.items())
    for round_ in range(count):
        for name, step in order if round_ % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
        print(f"step {round_ + 1}/{count}: " + ", ".join(f"{name} {seconds[-1]:.3f} s"
                                                         for name, seconds in times.items()), flush=True)
    return times


# A step time's max / min beyond this: other jobs' load (or the machine's clocks) moved during the run, and a ratio
# of two medians may say more about that than about the two trainers.
SPREAD_WARNING = 2.0


def spread(seconds: list[float]) -> dict:
    """min, median and max of a run's step times and max / min: how steady the machine was while they ran."""
    low, high = min(seconds), max(seconds)
    return {"min_s": low, "median_s": float(np.median(seconds)), "max_s": high,
            "max_over_min": high / low if low > 0 else float("inf")}


def spread_warning(spreads: dict[str, dict]) -> str:
    """A warning line where any side's step times spread beyond SPREAD_WARNING; "" where all were steady."""
    unsteady = [f"{name}'s from {s['min_s']:.3f} to {s['max_s']:.3f} s ({s['max_over_min']:.1f}x)"
                for name, s in spreads.items() if s["max_over_min"] > SPREAD_WARNING]
    if not unsteady:
        return ""
    return (f"warning: step times varied by more than {SPREAD_WARNING:g}x ({'; '.join(unsteady)}): the machine's "
            "load changed during the run, and the figures (a speedup above all) are unreliable; rerun on a quiet "
            "machine")


def pipelined_times(step: Callable[..., dict], count: int) -> list[float]:
    """Seconds between the completions of `count` steps run as the trainer runs them (the first from the start): the
    host dispatches the next steps while the device runs this one, at most `dispatch_depth()` beyond the last
    finished (none on the CPU). Once the steps in flight are full, that interval is the step's time as the trainer
    sees it. `interleaved_times` waits for every step, so its step time also holds the host's launch time (on
    2026-12-04's H200, 20-30 ms of unscanned B/16's 230 ms step were the GPU idle before the step began)."""
    step()
    ahead, in_flight, done = dispatch_depth(), collections.deque(), [time.perf_counter()]
    for _ in range(count):
        in_flight.append(step(wait=False))
        while len(in_flight) > ahead:
            jax.block_until_ready(in_flight.popleft())
            done.append(time.perf_counter())
    while in_flight:
        jax.block_until_ready(in_flight.popleft())
        done.append(time.perf_counter())
    return [later - earlier for earlier, later in itertools.pairwise(done)]


def peak_rates(product: Callable[[int], Callable[[], None]], sizes: tuple[int, ...], repeats: int) -> dict:
    """TFLOP/s of the best of `repeats` timed calls of `product(n)()` (one n x n by n x n product, returning when
    done) after an untimed one, per size, and the best over sizes."""
    rates = {}
    for n in sizes:
        multiply = product(n)
        multiply()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            multiply()
            best = min(best, time.perf_counter() - t0)
        rates[n] = 2 * n**3 / best / 1e12
    return {"tflops_per_s_by_size": rates, "peak_tflops_per_s": max(rates.values())}


def matmul_peak(dtype: str, repeats: int = 5) -> dict:
    """The best FLOP/s of one square matmul through JAX on the first device, per size: the machine's practical
    matmul peak, measured in the same run as the step (on a shared CPU, a vendor peak means little). Random
    operands: a GPU multiplies zeros or ones faster (less switching power, higher clocks)."""
    matmul = jax.jit(lambda x, y: x @ y)

    def product(n: int) -> Callable[[], None]:
        a = jax.random.normal(jax.random.PRNGKey(n), (n, n), dtype)
        return lambda: matmul(a, a).block_until_ready()

    # a GPU needs large products to run well past the launch overhead
    sizes = (2048, 4096, 8192, 16384) if jax.devices()[0].platform == "gpu" else (1024, 2048, 4096)
    return peak_rates(product, sizes, repeats)


LAYOUT_OPS = {"fusion", "copy", "transpose", "bitcast", "parameter", "reshape", "broadcast", "pad", "slice",
              "concatenate", "dynamic-slice", "dynamic-update-slice", "tuple", "get-tuple-element"}
# Library kernels that a GPU trace names by themselves (inside a CUDA graph, the `hlo_op` stat only names the graph):
# the kind of each, by its name.
LIBRARY_KERNELS = [("attention", re.compile(r"cudnn|sdpa|fmha|flash", re.I)),
                   ("matmul", re.compile(r"nvjet|gemm|xmma|cutlass|cublas|wgmma", re.I)),
                   ("layout", re.compile(r"memcpy|memset", re.I)),
                   # this project's Pallas kernels, named after their pallas_call (layer_norm_kernel.py): inside a
                   # CUDA graph their events name only the graph, so they were unmatched time on 2026-12-06
                   ("reduction", re.compile(r"^layer_norm_(forward|backward)"))]


def op_kinds(hlo: str) -> dict[str, tuple[str, str]]:
    """Kind of each instruction of the optimised HLO that can show as an op in a profile: `attention` (a fused
    attention library call), `matmul` (a dot, convolution or other library call inside), `layout` (data movement
    only: copies, transposes, pads, slices), `reduction`, `elementwise`; with the JAX op name (`op_name` metadata)
    it came from."""
    computations = hlo_lib.computations(hlo)
    kinds = {}
    # An instruction's type is one shape, or a tuple of them (with spaces) for a multi-output fusion, whose long
    # ones hold comments with "=" in them (/*index=5*/).
    for m in re.finditer(r"%([\w.\-]+) = (?:.*?) (\w[\w-]*)\(([^\n]*)", hlo):
        name, opcode, rest = m.groups()
        body = rest
        called = re.search(r"calls=%([\w.\-]+)", rest)
        if called:
            body = computations.get(called.group(1), "")
        ops = set(re.findall(r"= (?:.*?) (\w[\w-]*)\(", body)) | {opcode}
        if "custom-call" in ops and re.search(r'custom_call_target="[^"]*fmha', body):
            kind = "attention"
        elif ops & {"dot", "convolution", "custom-call"}:
            kind = "matmul"
        elif ops <= LAYOUT_OPS:
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


def print_collectives(facts: dict) -> None:
    if facts["collectives_per_device"]:
        print(f"per-device collectives per step: {hlo_lib.describe_traffic(facts['collectives_per_device'])}")


def op_events(data) -> list[tuple[str, str, str, float, float]]:
    """(plane name, HLO instruction name, kernel name, start and end in seconds) of every op event of a trace: the
    events that name their instruction in an `hlo_op` stat (a CPU's ops on the host's threads, a GPU's kernels on
    its stream lines; several kernels can make one op, and a kernel run inside a CUDA graph names the graph there),
    or, on a plane of a post-processed trace, its derived "XLA Ops" line alone (the same ops again)."""
    events = []
    for plane in data.planes:
        derived = [line for line in plane.lines if line.name == "XLA Ops"]
        for line in derived or plane.lines:
            for event in line.events:
                op = event.name if derived else dict(event.stats).get("hlo_op")
                if op:
                    events.append((plane.name, str(op).lstrip("%"), event.name, event.start_ns / 1e9,
                                   event.end_ns / 1e9))
    return events


def event_kind(op: str, kernel: str, kinds: dict[str, tuple[str, str]]) -> tuple[str, str] | None:
    """(kind, JAX op name) of one op event: its instruction's, found in `kinds` (`op_kinds`, with each name also
    spelt as its kernel's: XLA names a fusion's kernel after the fusion, with '_' for '.' and '-') by the `hlo_op`
    it names or else by its kernel's name; a library's or Pallas kernel's kind by its name; None for another
    program's event."""
    for name in (op, kernel):
        if name in kinds:
            return kinds[name]
    for kind, pattern in LIBRARY_KERNELS:
        if pattern.search(kernel):
            return kind, f"kernel {kernel[:60]}"
    return None


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: the time a device ran at least one op."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy


PROFILE_SUFFIXES = (".xplane.pb.gz", ".hlo.txt.gz")  # a kept profile's trace and optimised HLO


def profile_step(step: Callable[[], None], hlo: str, keep: pathlib.Path | None = None) -> dict:
    """`trace_summary` of one step's jax.profiler trace, with the step's wall time. `keep`: a path without suffix
    for the trace (.xplane.pb.gz: gunzip it for TensorBoard or xprof) and the optimised HLO (.hlo.txt.gz), which
    `--read-profile` summarises again."""
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        t0 = time.perf_counter()
        step()
        step_s = time.perf_counter() - t0
        jax.profiler.stop_trace()
        trace = next(pathlib.Path(trace_dir).rglob("*.xplane.pb"))
        if keep is not None:  # (its folder made and checked at start-up: checked_out_folder)
            trace_suffix, hlo_suffix = PROFILE_SUFFIXES
            keep.with_name(keep.name + trace_suffix).write_bytes(gzip.compress(trace.read_bytes()))
            keep.with_name(keep.name + hlo_suffix).write_bytes(gzip.compress(hlo.encode()))
        return {"step_s": step_s, **trace_summary(ProfileData.from_file(str(trace)), hlo)}


def read_kept_profile(stem: str) -> dict:
    """`trace_summary` of a trace kept by `--keep-profile` (the path without its .xplane.pb.gz / .hlo.txt.gz)."""
    from jax.profiler import ProfileData

    trace_suffix, hlo_suffix = PROFILE_SUFFIXES
    data = ProfileData.from_serialized_xspace(gzip.decompress(pathlib.Path(f"{stem}{trace_suffix}").read_bytes()))
    return trace_summary(data, gzip.decompress(pathlib.Path(f"{stem}{hlo_suffix}").read_bytes()).decode())


def trace_summary(data, hlo: str, top: int = 25) -> dict:
    """Time by op kind and the costliest ops of a trace of the program whose optimised HLO is `hlo`. Where the trace
    has a GPU's plane its kernels alone count (the host's events that name an op only launch it), and
    `device_busy_s` against the step's time says how long the GPU sat idle. Ops on a CPU run on the XLA thread
    pool, some concurrently, so the op times can sum to more than the step."""
    kinds = op_kinds(hlo)
    kinds.update({name.replace(".", "_").replace("-", "_"): kind for name, kind in kinds.items()})  # kernel names
    events = op_events(data)
    planes = collections.Counter(plane for plane, *_ in events)
    gpu_planes = {plane for plane in planes if "GPU" in plane}
    events = [e for e in events if e[0] in gpu_planes] if gpu_planes else events
    by_kind, by_op = collections.Counter(), collections.Counter()
    unknown = collections.Counter()  # op names the optimised HLO does not hold (another program's, say)
    for _, name, kernel, start, end in events:
        found = event_kind(name, kernel, kinds)
        if found is None:
            unknown[name] += end - start
            continue
        kind, op_name = found
        by_kind[kind] += end - start
        by_op[(kind, op_name)] += end - start
    total = sum(by_kind.values())
    return {
        "op_seconds": total,
        "op_events_by_plane": dict(planes),
        "device_busy_s": busy_seconds([(start, end) for *_, start, end in events]) if gpu_planes else None,
        "seconds_by_kind": dict(by_kind.most_common()),
        "share_by_kind": {k: v / total for k, v in by_kind.most_common()} if total else {},
        "top_ops": [{"kind": k, "op_name": name, "seconds": v} for (k, name), v in by_op.most_common(top)],
        "unmatched_op_seconds": sum(unknown.values()),
        "top_unmatched_ops": unknown.most_common(5),
    }


def result_name(args: argparse.Namespace, facts: dict, platform_name: str) -> str:
    """The JSON file's name: what was timed, its dtype, batch and step options."""
    if args.config:
        path, _, arg = args.config.partition(":")
        subject = pathlib.Path(path).stem + (f"-{arg}" if arg else "")
    else:
        subject = args.preset + "".join(f"_{k}{getattr(args, a)}" for k, a in
                                        (("px", "image_size"), ("ctx", "context_length")) if getattr(args, a))
    model = facts["model"]
    not_xla = sorted(set(model["attention"].values()) - {"xla"})  # "_cudnn" if any tower runs cuDNN's
    options = "".join((f"_remat-{model['remat_policy']}" if model["remat_policy"] != "none" else "",
                       "_scan" if model["scan_layers"] else "", "".join(f"_{name}" for name in not_xla),
                       f"_ln-{model['layer_norm']}" if model["layer_norm"] != "xla" else "",
                       f"_patchdrop{model['patch_dropout']:g}" if model.get("patch_dropout") else ""))
    sizes = tuple(facts["mesh"].values())  # named unless the default: data parallelism over every device
    mesh = "" if args.mesh in (None, (-1, 1, 1)) and sizes[1:] == (1, 1) else f"_mesh{'-'.join(map(str, sizes))}"
    mesh += f"_accum{facts['accum_steps']}" if facts["accum_steps"] > 1 else ""
    kind = "_compiled" if args.compile_only else ""
    return (f"train_step_{subject.replace('/', '')}_{model['dtype']}_b{facts['batch']}{options}{mesh}{kind}_"
            f"{platform_name}.json")


def main() -> None:
    args = parse_args()
    if args.read_profile:
        missing = [f"{args.read_profile}{suffix}" for suffix in PROFILE_SUFFIXES
                   if not pathlib.Path(f"{args.read_profile}{suffix}").is_file()]
        if missing:
            sys.exit(f"--read-profile {args.read_profile}: no kept trace there ({' and '.join(missing)} missing; "
                     "STEM is the path without .xplane.pb.gz)")
        print(json.dumps(read_kept_profile(args.read_profile), indent=2))
        return
    if args.open_clip and importlib.util.find_spec("open_clip") is None:
        sys.exit(OPEN_CLIP_MISSING)
    # as clip-jax does on the CPU (clip_jax/host_memory.py); before JAX starts
    kept_freed_memory = args.malloc == "keep" and keep_freed_memory()
    # before minutes of measuring, not after them
    try:  # the recipe with the command line's overrides, in one line as clip-jax says it (cudnn off a GPU, say)
        config = benchmark_config(args)
        check_gpu_implementations(config, jax.devices()[0].platform)
    except ConfigError as e:
        sys.exit(f"train_step: {e}")
    out = checked_out_folder(args.out)
    keep_dir = checked_out_folder(args.keep_profile, "--keep-profile") if args.profile and args.keep_profile else None
    jnp.zeros(())  # initialise the backend before timing
    device = jax.devices()[0]
    steps, facts, hlo = {}, {}, ""
    steps["clip_jax"], facts["clip_jax"], hlo = build_clip_jax(args, config)
    header = {
        "benchmark": "train_step",
        "date": datetime.date.today().isoformat(),
        "machine": {**environment_facts(), "device_kind": device.device_kind, "num_devices": jax.device_count()},
        "jax": jax.__version__,
        "flax": importlib.metadata.version("flax"),
        "optax": importlib.metadata.version("optax"),
        "args": vars(args),
    }
    if args.compile_only:
        ours = {k: v for k, v in facts["clip_jax"].items() if k != "step_metrics"}
        path = new_result_path(out / result_name(args, ours, device.platform))
        path.write_text(results_json({**header, "clip_jax": ours}))
        print(json.dumps(ours, indent=2))
        print_collectives(ours)
        print(f"saved {path}")
        return
    if args.open_clip:
        steps["open_clip"], facts["open_clip"], torch_peak, stop_open_clip = open_clip_in_process(args)
    times = interleaved_times(steps, args.steps)
    spreads = {name: spread(seconds) for name, seconds in times.items()}
    warning = spread_warning(spreads)
    pipelined = pipelined_times(steps["clip_jax"], args.steps)
    pipelined_s = float(np.median(pipelined))  # the median, as for the steps timed one by one
    if args.open_clip:
        facts["open_clip"]["matmul"] = torch_peak()  # the peak of the library under open_clip, while JAX idles
        stop_open_clip()
    peak = matmul_peak(facts["clip_jax"]["model"]["dtype"])
    result = {
        **header,
        "kept_freed_memory": kept_freed_memory,
        "matmul": peak,
    }
    tflop = facts["clip_jax"]["model_tflops_per_step"]
    vendor_peak = flops_lib.peak_flops_per_device(device.device_kind)
    batch = facts["clip_jax"]["batch"]
    for name, seconds in times.items():
        step_s = float(np.median(seconds))
        result[name] = {"step_time_s": step_s, "step_times_s": seconds, "samples_per_s": batch / step_s,
                        "tflops_per_s": tflop / step_s, "step_spread": spreads[name], **facts[name]}
    if warning:
        result["warning"] = warning
    ours = result["clip_jax"]
    # The numerics of the timed implementation: every step's loss on the same batch (a run with another attention
    # or dtype should follow the same curve), and how many steps were skipped as not finite.
    step_metrics = ours.pop("step_metrics")
    ours["losses"] = [float(loss) for loss in step_metrics["loss"]]
    ours["nonfinite_steps"] = int(sum(int(flag) for flag in step_metrics["nonfinite"]))
    ours["fraction_of_matmul_peak"] = ours["tflops_per_s"] / (peak["peak_tflops_per_s"] * jax.device_count())
    # The step's model FLOPs at the matmul peak measured here: the time they take at the best rate this machine
    # showed, so open_clip's step over it bounds the speedup over open_clip that a trainer doing the same FLOPs
    # can reach on this machine (issue 15's 2x is out of reach where that bound is below 2).
    result["matmul_floor_s"] = tflop / (peak["peak_tflops_per_s"] * jax.device_count())
    ours["mfu"] = ours["tflops_per_s"] * 1e12 / (vendor_peak * jax.device_count()) if vendor_peak else None
    ours["pipelined"] = {"step_time_s": pipelined_s, "step_times_s": pipelined,
                         "mean_step_time_s": float(np.mean(pipelined)), "samples_per_s": batch / pipelined_s,
                         "tflops_per_s": tflop / pipelined_s, "mfu": None}
    if vendor_peak:
        ours["pipelined"]["mfu"] = tflop * 1e12 / (pipelined_s * vendor_peak * jax.device_count())
    if args.open_clip:
        result["speedup_vs_open_clip"] = result["open_clip"]["step_time_s"] / ours["step_time_s"]
        result["speedup_ceiling_vs_open_clip"] = result["open_clip"]["step_time_s"] / result["matmul_floor_s"]
        theirs = result["open_clip"]
        theirs["fraction_of_matmul_peak"] = theirs["tflops_per_s"] / theirs["matmul"]["peak_tflops_per_s"]
    path = new_result_path(out / result_name(args, ours, device.platform))
    name = path.name
    path.write_text(results_json(result))  # the timing stays if the profile stalls
    if args.profile:
        try:
            # a name no earlier trace there has: a suite's runs keep their traces in one folder
            keep = keep_dir / new_result_stem(keep_dir, pathlib.Path(name).stem, PROFILE_SUFFIXES) if keep_dir else None
            result["profile"] = profile_step(steps["clip_jax"], hlo, keep=keep)
            if keep is not None:
                result["profile"]["kept_as"] = str(keep)  # the stem --read-profile takes
        except Exception as e:  # a profiler that fails on some platform leaves the step's timing
            result["profile"] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result, indent=2))
    print(f"clip_jax {ours['step_time_s']:.3f} s/step ({pipelined_s:.3f} pipelined), "
          f"{ours['tflops_per_s']:.3f} TFLOP/s = "
          f"{ours['fraction_of_matmul_peak']:.0%} of the {peak['peak_tflops_per_s']:.3f} TFLOP/s matmul peak"
          + (f"; open_clip {result['open_clip']['step_time_s']:.3f} s/step: {result['speedup_vs_open_clip']:.2f}x"
             f" (at most {result['speedup_ceiling_vs_open_clip']:.2f}x here: the step's FLOPs at the matmul peak "
             f"take {result['matmul_floor_s']:.3f} s); open_clip at "
             f"{result['open_clip']['fraction_of_matmul_peak']:.0%} of torch's "
             f"{result['open_clip']['matmul']['peak_tflops_per_s']:.3f} TFLOP/s matmul peak" if args.open_clip else ""))
    print_collectives(ours)
    if warning:
        print(warning)
    if ours["nonfinite_steps"]:
        print(f"warning: {ours['nonfinite_steps']} of {len(ours['losses'])} steps had a non-finite loss or gradient")
    path.write_text(results_json(result))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
