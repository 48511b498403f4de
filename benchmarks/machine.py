"""The facts about this machine's CPU, and about the code and environment a run measured, that a benchmark's JSON
records, so that runs on different machines or of different code are not compared by mistake.

The model name alone does not tell CPUs apart: this project's development VMs all report "AMD EPYC", yet on
2026-12-04 one of them multiplied fp32 matrices at 0.50 TFLOP/s through JAX and another, the same day, at 0.21
(family 25, model 17: a Zen 4). The family, model and SIMD extensions do tell them apart.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import socket
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]

# The SIMD extensions that decide which matmul kernels XLA:CPU, oneDNN and MKL pick.
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile")


def cpu_facts(cpuinfo: str | None = None) -> dict:
    """Model name, family, model, stepping, SIMD extensions and core count of this machine's CPU, from Linux's
    /proc/cpuinfo (`cpuinfo`: its text, for tests); elsewhere the processor name alone."""
    facts = {"model_name": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if cpuinfo is None:
        try:
            cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
        except OSError:
            return facts
    first = {}  # the first processor's entries: every core of a VM reports the same
    for line in cpuinfo.splitlines():
        if not line.strip():
            if first:
                break
            continue
        key, _, value = line.partition(":")
        first[key.strip()] = value.strip()
    if "model name" in first:
        facts["model_name"] = first["model name"]
    for key in ("cpu family", "model", "stepping"):
        if first.get(key, "").isdigit():
            facts[key.replace("cpu ", "")] = int(first[key])
    flags = set(first.get("flags", "").split())
    facts["simd"] = [flag for flag in SIMD_FLAGS if flag in flags]
    return facts


def source_facts(repo: pathlib.Path = REPO) -> dict:
    """The git commit the run's code came from and whether the working tree differed from it (`dirty`: a figure
    from uncommitted code cannot be reproduced from the commit alone); both None outside a git checkout."""
    def git(*args: str) -> str | None:
        try:  # --no-optional-locks: a benchmark never blocks a commit being made meanwhile
            done = subprocess.run(["git", "--no-optional-locks", *args], cwd=repo, capture_output=True, text=True,
                                  timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")  # this project's checkout, not a repository it was copied into
    commit = git("rev-parse", "HEAD") if top and pathlib.Path(top).resolve() == pathlib.Path(repo).resolve() else None
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def environment_facts() -> dict:
    """What every benchmark's JSON records beside its figures: the host, its CPU (`cpu_facts`), the load from other
    jobs when the facts were taken, the time of day (UTC), Python and the OS, and the code (`source_facts`)."""
    return {
        "host": socket.gethostname(),
        "cpu": cpu_facts(),
        "load_average": os.getloadavg(),
        "time_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": source_facts(),
    }
