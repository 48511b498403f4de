"""Reading XLA's optimised HLO text (`compiled.as_text()`): its computations, how often each runs per step, and what
the step's collectives move on each device. The trainer's compile report and benchmarks/train_step.py print the
last; a badly sharded model shows there before its first step (a resharding that XLA can do only by replicating an
array is an all-gather of the whole of it)."""

from __future__ import annotations

import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def computations(hlo: str) -> dict[str, str]:
    """The computations of an HLO module's text, the entry's included: name -> its instructions. (Split at the
    closing braces rather than by one regex over the text: a step's module is megabytes even for a tiny model.)"""
    found = {}
    for block in hlo.split("\n}\n"):
        lines = block.split("\n")
        for i, line in enumerate(lines):
            if line.endswith("{") and line.startswith(("%", "ENTRY %")):
                found[line.removeprefix("ENTRY ").split(" ", 1)[0][1:]] = "\n".join(lines[i + 1:]).removesuffix("\n}")
                break
    return found


def _entry(hlo: str) -> str | None:
    entry = re.search(r"^ENTRY %([\w.\-]+)", hlo, re.M)
    return entry.group(1) if entry else None


def runs_per_step(hlo: str) -> dict[str, int]:
    """How many times each computation runs per execution of the module's entry: a while loop's body (scanned
    layers, say) as many times as the loop's known trip count, computations it calls as often as it runs. A loop
    whose count XLA does not know counts once."""
    return _runs(computations(hlo), _entry(hlo))


def _runs(bodies: dict[str, str], entry: str | None) -> dict[str, int]:
    calls: dict[str, list[tuple[str, int]]] = {}  # computation -> (what it calls, how many times per run)
    for name, body in bodies.items():
        calls[name] = []
        for line in body.splitlines():
            if "=%" not in line and "={%" not in line:
                continue
            loop = re.search(r"body=%([\w.\-]+)", line)
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            for called in re.findall(r"(?:calls|body|condition|to_apply|branch_computations)=\{?%([\w.\-]+)", line):
                looped = trips and loop and called == loop.group(1)
                if called in bodies:
                    calls[name].append((called, int(trips.group(1)) if looped else 1))
    runs: dict[str, int] = {}

    def visit(name: str, times: int) -> None:
        runs[name] = runs.get(name, 0) + times
        for called, per_run in calls[name]:
            visit(called, times * per_run)

    if entry in bodies:
        visit(entry, 1)
    return runs


def collective_traffic(hlo: str) -> dict[str, dict]:
    """What the collectives produce on each device per step, by kind: how many run, the MiB of their results and
    the largest one's. A collective inside a loop counts once per trip (`runs_per_step`), an asynchronous one once,
    at its `-done`, whose result is what arrives."""
    markers = tuple(f" {opcode}" for opcode in COLLECTIVES)  # what a line must hold to be worth the regex
    if not any(marker in hlo for marker in markers):
        return {}
    bodies = computations(hlo)
    runs = _runs(bodies, _entry(hlo))
    # (a long tuple's type has comments with "=" in it: /*index=5*/)
    instruction = re.compile(rf"= (.*?) ({'|'.join(COLLECTIVES)})(-start|-done)?\(")
    traffic = {}
    for computation, body in bodies.items():
        for line in body.splitlines():
            m = instruction.search(line) if any(marker in line for marker in markers) else None
            if m is None or m.group(3) == "-start":
                continue
            size = 0
            for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1)):
                bits = re.search(r"\d+$", dtype)
                size += (int(bits.group()) / 8 if bits else 1) * math.prod(int(d) for d in dims.split(",") if d)
            times = runs.get(computation, 1)
            kind = traffic.setdefault(m.group(2), {"ops": 0, "mib": 0.0, "largest_mib": 0.0})
            kind["ops"] += times
            kind["mib"] += times * size / 2**20
            kind["largest_mib"] = max(kind["largest_mib"], size / 2**20)
    return {opcode: {**kind, "mib": round(kind["mib"], 3), "largest_mib": round(kind["largest_mib"], 3)}
            for opcode, kind in traffic.items()}


def describe_traffic(traffic: dict[str, dict]) -> str:
    """`collective_traffic` in one line."""
    return "; ".join(f"{opcode} {kind['ops']} ops, {kind['mib']:.2f} MiB (largest {kind['largest_mib']:.2f})"
                     for opcode, kind in traffic.items())
