"""The facts about this machine's CPU that a benchmark's JSON records, so that runs on different machines are not
compared by mistake.

The model name alone does not tell CPUs apart: this project's development VMs all report "AMD EPYC", yet on
2026-12-04 one of them multiplied fp32 matrices at 0.50 TFLOP/s through JAX and another, the same day, at 0.21
(family 25, model 17: a Zen 4). The family, model and SIMD extensions do tell them apart.
"""

from __future__ import annotations

import os
import pathlib
import platform

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
