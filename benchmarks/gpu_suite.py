"""Issue 15's GPU measurements in one command: cuDNN's attention against XLA's in numerics
(`attention_parity.py`), LayerNorm alone with XLA's fusions and the Pallas kernels (`layer_norm.py`), then B/16
bf16 training MFU with each, remat policies and the largest batch that fits, the Long-CLIP L/14 fine-tune (248
tokens), and a per-op profile of each headline step.

  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python benchmarks/gpu_suite.py --budget 500 --out benchmarks/results

JAX takes 75% of a GPU's memory by default; the largest batches need more.

Each configuration is one `benchmarks/train_step.py` run in a process of its own (a batch that does not fit fails
alone), in order of priority, until the time budget is spent. Everything, failures included, goes into one JSON file,
`gpu_suite_<device>_<date>.json` (`_2`, `_3`... for the day's next ones), rewritten after every run (a command
stopped half-way still leaves what it measured), beside the traces (.xplane.pb.gz) and optimised HLO (.hlo.txt.gz)
of the runs that keep their profile (named like the run's JSON, `_2`... where an earlier suite's are there; each run
records its trace's path as `profile.kept_as`): `train_step.py --read-profile` summarises one again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE.resolve()))  # machine.py, result_files.py beside it
from machine import environment_facts  # noqa: E402
from result_files import checked_out_folder, count, new_result_path  # noqa: E402

from clip_jax.files import results_json  # noqa: E402

B16 = ["--preset", "B/16", "--dtype", "bfloat16"]
B16_SCANNED = [*B16, "--scan"]
LONGCLIP_L14 = ["--config", str(HERE.parent / "configs" / "longclip_l14.py")]

# (name, train_step.py arguments, XLA flags added for the run), in order of priority: the headline step as the
# recipes run it (unrolled layers; on a Hopper GPU cuDNN's attention and the Pallas LayerNorm kernels, the defaults)
# profiled, then with XLA's LayerNorm (1.21x slower on an H100 on 2026-12-06, untimed on other GPUs), the Long-CLIP
# recipe as it ships (unscanned: it did not compile in 153 s on an H200 nor in 110 s on an H100, so it has the
# run's full time) and scanned, the headline step scanned (profiled: the scan's copies), under FLIP's patch dropout
# (half the patch tokens: its samples/s against the headline's; its MFU counts the kept tokens' FLOPs) and with XLA's
# attention, without remat (the recomputed LayerNorms and GELUs cost passes over memory) at batch 256 (scanned at
# 512 it needed 80 GiB of temporaries), at batch 1,024, then cuBLAS against Triton's matmuls and the batch and remat
# sweep (scanned: one layer to compile).
# XLA's options against the step's non-matmul half (cuBLASLt, the fusion autotuner, cuDNN's GEMM fusions and
# LayerNorm, no Triton multi-output fusions) were run on 2026-12-04 and moved nothing (docs/benchmarks.md); the
# added-flags slot runs such options. "{out}" is the suite's output folder, where the profiled headline steps'
# traces and optimised HLO are kept.
HEADLINE = [*B16, "--batch", "512", "--remat", "dots"]
KEEP_PROFILE = ["--profile", "--keep-profile", "{out}"]
RUNS: list[tuple[str, list[str], str]] = [
    ("b16_b512_dots", [*HEADLINE, *KEEP_PROFILE], ""),
    ("b16_b512_dots_xla_layer_norm", [*HEADLINE, "--layer-norm", "xla"], ""),
    ("longclip_l14_b256", [*LONGCLIP_L14, "--batch", "256"], ""),  # the recipe as it ships
    ("longclip_l14_b256_scan", [*LONGCLIP_L14, "--scan", "--batch", "256", "--profile"], ""),
    ("b16_b512_dots_scan", [*HEADLINE, "--scan", *KEEP_PROFILE], ""),
    ("b16_b512_dots_patchdrop50", [*HEADLINE, "--patch-dropout", "0.5"], ""),
    ("b16_b512_dots_xla_attention", [*HEADLINE, "--attention", "xla"], ""),
    ("b16_b256_none", [*B16, "--batch", "256", "--remat", "none"], ""),
    ("b16_b1024_dots", [*B16, "--batch", "1024", "--remat", "dots"], ""),
    ("b16_b512_dots_cublas", HEADLINE, "--xla_gpu_enable_triton_gemm=false"),
    ("b16_b2048_dots_no_batch", [*B16_SCANNED, "--batch", "2048", "--remat", "dots_no_batch"], ""),
    ("b16_b8192_full", [*B16_SCANNED, "--batch", "8192", "--remat", "full"], ""),
    ("b16_b512_none", [*B16_SCANNED, "--batch", "512", "--remat", "none"], ""),
    ("b16_b4096_full", [*B16_SCANNED, "--batch", "4096", "--remat", "full"], ""),
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=450, help="seconds for all the runs together (default: 450)")
    p.add_argument("--run-timeout", type=float, default=240, help="seconds for one run at most")
    p.add_argument("--min-left", type=float, default=45, help="no run starts with fewer seconds of budget left")
    p.add_argument("--steps", type=count, default=10, help="timed steps per run")
    p.add_argument("--only", nargs="*", help="run only these names, the CHECKS' among them (default: all, in "
                   "order)")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    known = [*CHECKS, *(name for name, _, _ in RUNS)]
    unknown = [name for name in args.only or [] if name not in known]
    if unknown:  # a misspelt name ran nothing of it, silently
        p.error(f"--only: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    return args


def run_script(script: str, args: list[str], timeout: float,
               env: dict | None = None) -> tuple[dict | None, str, str, float]:
    """Runs benchmarks/`script` with `args` and `--out` a folder of its own: (the JSON result it wrote, with the
    file's name, or None; how it failed, "" if it did not; the end of its output; wall seconds)."""
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(HERE / script), *args, "--out", out], capture_output=True,
                                  text=True, timeout=timeout, env=env)
            failure, output = f"exit status {proc.returncode}" if proc.returncode else "", proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            output = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
            failure = f"timed out after {timeout:.0f} s"
        wall = time.perf_counter() - t0
        files = list(pathlib.Path(out).glob("*.json"))
        result = {**json.loads(files[0].read_text()), "result_file": files[0].name} if files else None
        return result, failure, output[-3000:], wall


def run_one(args: list[str], timeout: float, steps: int, xla_flags: str = "") -> dict:
    """One train_step.py run, with `xla_flags` added to XLA_FLAGS: its JSON result, or how it failed (the reason and
    the end of its output). The timing is written before the profile, so a run that failed or stalled after it
    keeps its timing, with the failure as its profile's."""
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip()}
    result, failure, output, wall = run_script("train_step.py", [*args, "--steps", str(steps)], timeout, env)
    if result is None:
        return {"error": failure or "no result written", "wall_s": wall, "output_tail": output}
    return {**result, "wall_s": wall, **({"profile": {"error": failure}} if failure else {})}


# Scripts run before the timed steps, each with its time limit: LayerNorm's forward and backward alone, XLA's
# fusions against the Pallas kernels (and the kernels' tilings), then cuDNN's attention against XLA's in numerics
# (its first two shapes were measured on 2026-12-04; it saves shape by shape).
CHECKS = {"layer_norm": ("layer_norm.py", 120), "attention_parity": ("attention_parity.py", 120)}


def check(script: str, timeout: float) -> dict:
    """A check script's result, or how it failed (with what it saved before: the checks save as they go); off an
    NVIDIA GPU they measure nothing, and their output says so."""
    result, failure, output, _ = run_script(script, [], timeout)
    if result is None:
        return {"error": failure or "nothing measured", "output_tail": output}
    return {**result, "error": failure} if failure else result


def summary_line(name: str, result: dict) -> str:
    if "error" in result:
        return f"{name}: FAILED ({result['error']}, {result['wall_s']:.0f} s)"
    ours = result["clip_jax"]
    mfu = f"{ours['mfu']:.1%} MFU" if ours.get("mfu") is not None else "no vendor peak"
    losses = ours.get("losses") or [float("nan")]
    numerics = (f"{ours['nonfinite_steps']} NON-FINITE steps" if ours.get("nonfinite_steps")
                else f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    piped = ours.get("pipelined") or {}
    piped = (f" (pipelined {piped['step_time_s'] * 1e3:.1f} ms, {piped['mfu']:.1%})" if piped.get("mfu") is not None
             else "")
    temp = ours.get("temp_memory_gib_per_device")  # None where XLA gives no memory analysis
    temp = f"{temp:.1f} GiB" if temp is not None else "-"
    return (f"{name}: {ours['step_time_s'] * 1e3:.1f} ms/step, {ours['samples_per_s']:.0f} samples/s, "
            f"{ours['tflops_per_s']:.0f} TFLOP/s, {mfu}{piped}, {ours['fraction_of_matmul_peak']:.0%} of the measured "
            f"matmul peak, temp {temp}, compile {ours['compile_s']:.0f} s "
            f"(wall {result['wall_s']:.0f} s), {numerics}")


def profile_lines(result: dict, top: int = 10) -> list[str]:
    """The profile of a run in a few lines (the GPU's busy time, the time by op kind, the costliest ops), so the
    command's own output already says where the step's time went."""
    profile = result.get("profile") or {}
    if not profile.get("op_seconds"):
        return [f"  profile: {profile.get('error') or 'no op events'}"] if profile else []
    busy = profile.get("device_busy_s")
    lines = [f"  profile: step {profile['step_s'] * 1e3:.1f} ms, ops {profile['op_seconds'] * 1e3:.1f} ms"
             + (f", GPU busy {busy * 1e3:.1f} ms" if busy is not None else "")
             + f", unmatched {profile['unmatched_op_seconds'] * 1e3:.1f} ms; events by plane "
             f"{profile.get('op_events_by_plane')}",
             "  by kind: " + ", ".join(f"{k} {v:.1%}" for k, v in profile["share_by_kind"].items())]
    lines += [f"  {op['seconds'] * 1e3:8.2f} ms {op['kind']:<11} {op['op_name'][:150]}"
              for op in profile["top_ops"][:top]]
    return lines


def device_facts() -> dict:
    """What the runs ran on, from a process of its own (this one never starts JAX's backend)."""
    code = ("import jax, json; d = jax.devices()[0]; print(json.dumps({'device_kind': d.device_kind, "
            "'platform': d.platform, 'count': jax.device_count(), 'jax': jax.__version__}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.stderr[-500:]}


def main() -> None:
    args = parse_args()
    out = checked_out_folder(args.out)
    start = time.perf_counter()
    device = device_facts()
    print("device:", device, flush=True)
    if device.get("platform") != "gpu":  # B/16 at batch 512 on a CPU only spends the budget failing
        sys.exit(f"gpu_suite: needs an NVIDIA GPU (JAX's platform here is {device.get('platform')}): nothing measured")
    kind = str(device.get("device_kind", "unknown")).replace(" ", "_")
    stem = f"gpu_suite_{kind}_{datetime.date.today().isoformat()}"
    path = new_result_path(out / f"{stem}.json")  # a second suite of the day keeps the first's
    suite = {"benchmark": "gpu_suite", "date": datetime.date.today().isoformat(), "device": device,
             "machine": environment_facts(),
             "budget_s": args.budget, "xla_flags": os.environ.get("XLA_FLAGS", ""), "runs": {}, "skipped": []}
    for name, (script, timeout) in CHECKS.items():
        if not args.only or name in args.only:
            suite[name] = check(script, min(timeout, args.budget - (time.perf_counter() - start)))
            print(f"{name}:", json.dumps(suite[name].get("shapes", suite[name])), flush=True)
            path.write_text(results_json(suite))
    for name, run_args, xla_flags in RUNS:
        if args.only and name not in args.only:
            continue
        left = args.budget - (time.perf_counter() - start)
        if left < args.min_left:
            suite["skipped"].append(name)
            print(f"{name}: skipped, {left:.0f} s of budget left", flush=True)
            continue
        run_args = [a.replace("{out}", str(out)) for a in run_args]
        result = run_one(run_args, min(args.run_timeout, left), args.steps, xla_flags)
        suite["runs"][name] = {"command_args": run_args, "added_xla_flags": xla_flags, **result}
        path.write_text(results_json(suite))  # saved before a summary that might fail to format
        try:  # a summary that cannot be formatted costs its line, not the runs still to come
            print("\n".join([summary_line(name, result), *profile_lines(result)]), flush=True)
        except (KeyError, TypeError, ValueError) as e:
            print(f"{name}: saved; its summary could not be formatted ({type(e).__name__}: {e})", flush=True)
    suite["total_s"] = time.perf_counter() - start
    path.write_text(results_json(suite))
    print(f"saved {path} ({suite['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
