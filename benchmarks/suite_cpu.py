"""Where the test suite's CPU goes: CI runs the whole suite on 2 cores within 15 minutes, and the suite is
CPU-bound (4 xdist workers share the cores), so its time is its CPU over 2 and a cut anywhere shows.

    python benchmarks/suite_cpu.py [--top 25] [--out FILE] [-- PYTEST_ARGS...]

Runs `python -m pytest PYTEST_ARGS` (the project's own options from pyproject.toml apply) with this file as a plugin
(`-p suite_cpu`): every test's CPU, this process's and that of the processes it started and waited for, and its
wall time, as each worker records them. Module-scoped fixtures count where pytest runs them (a module's set-up in its
first test). Prints the files by CPU and the tests that used most; saves JSON with the whole run's wall and CPU time.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import pytest

from clip_jax.files import results_json  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECORDS_ENV = "CLIP_JAX_SUITE_CPU_DIR"  # where the plugin in each pytest worker writes its records


def _cpu() -> tuple[float, float]:
    """(this process's, its waited-for children's) user + system CPU seconds."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


# ---- the plugin, in each pytest process (a worker, or the main one without xdist) -----------------------------------
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if RECORDS_ENV not in os.environ:
        yield
        return
    own, children, wall = *_cpu(), time.monotonic()
    yield
    own_after, children_after = _cpu()
    record = {"test": item.nodeid, "cpu_s": own_after - own, "children_cpu_s": children_after - children,
              "wall_s": time.monotonic() - wall}
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(pathlib.Path(os.environ[RECORDS_ENV]) / f"{worker}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


@pytest.hookimpl
def pytest_runtest_logreport(report):
    """Each test's outcome (its call's, or its set-up's where that failed or skipped it), beside its CPU record."""
    if RECORDS_ENV not in os.environ or not (report.when == "call" or (report.when == "setup" and not report.passed)):
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(pathlib.Path(os.environ[RECORDS_ENV]) / f"{worker}.outcomes", "a") as f:
        f.write(json.dumps({"test": report.nodeid, "outcome": report.outcome}) + "\n")


# ---- the script -----------------------------------------------------------------------------------------------------
def per_file(records: list[dict]) -> list[dict]:
    """The records summed by test file, most CPU (own + children) first."""
    files: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in records:
        total = files[r["test"].split("::")[0]]
        total.update({"cpu_s": r["cpu_s"], "children_cpu_s": r["children_cpu_s"], "wall_s": r["wall_s"], "tests": 1})
    rows = [{"file": name, "total_cpu_s": round(t["cpu_s"] + t["children_cpu_s"], 1), "cpu_s": round(t["cpu_s"], 1),
             "children_cpu_s": round(t["children_cpu_s"], 1), "wall_s": round(t["wall_s"], 1), "tests": t["tests"]}
            for name, t in files.items()]
    return sorted(rows, key=lambda row: -row["total_cpu_s"])


def read_records(folder: pathlib.Path, suffix: str = "jsonl") -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob(f"*.{suffix}")) for line in path.read_text().splitlines()]


def run_pytest(pytest_args: list[str]) -> tuple[list[str], int, float, dict[str, float], list[dict], dict[str, int]]:
    """`python -m pytest PYTEST_ARGS` in the repository with the plugin: (the command, its exit code, its wall
    seconds, its user and system CPU seconds with every process it started, the tests' records, the count of each
    outcome: passed, skipped, failed)."""
    command = [sys.executable, "-m", "pytest", "-p", "suite_cpu", "-p", "no:cacheprovider", *pytest_args]
    with tempfile.TemporaryDirectory(prefix="suite_cpu_") as folder:
        path = os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, RECORDS_ENV: folder, "PYTHONPATH": path}
        before, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
        exit_code = subprocess.run(command, cwd=ROOT, env=env).returncode
        wall, after = time.monotonic() - wall, resource.getrusage(resource.RUSAGE_CHILDREN)
        records = read_records(pathlib.Path(folder))
        outcomes = collections.Counter(r["outcome"] for r in read_records(pathlib.Path(folder), "outcomes"))
    cpu = {"user_s": after.ru_utime - before.ru_utime, "system_s": after.ru_stime - before.ru_stime}
    return command, exit_code, wall, cpu, records, dict(outcomes)


def main() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine import environment_facts
    from result_files import checked_out_file, count

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=count, default=25, help="files and tests to print")
    parser.add_argument("--out", help="the JSON file, or a folder for the default name (default: "
                        "benchmarks/results/suite_cpu_<date>.json; never over an earlier one: _2, _3...)")
    parser.add_argument("pytest_args", nargs="*", help="after --: pytest's arguments (default: the whole suite)")
    args = parser.parse_args()
    today = datetime.date.today().isoformat()
    out = checked_out_file(args.out, ROOT / "benchmarks" / "results" / f"suite_cpu_{today}.json")

    command, exit_code, wall, cpu, records, outcomes = run_pytest(args.pytest_args)
    if exit_code not in (0, 1) or not records:  # pytest's usage error, internal error or no test: no suite's time
        sys.exit(f"pytest exited with {exit_code} after {len(records)} tests (2: interrupted, 3: internal error, "
                 "4: usage error, 5: no test collected): nothing saved")
    files = per_file(records)
    tests = sorted(records, key=lambda r: -(r["cpu_s"] + r["children_cpu_s"]))
    result = {
        "command": command[1:], "exit_code": exit_code, "wall_s": round(wall, 1),
        "cpu_s": round(cpu["user_s"] + cpu["system_s"], 1), **{k: round(v, 1) for k, v in cpu.items()},
        "tests_cpu_s": round(sum(r["cpu_s"] + r["children_cpu_s"] for r in records), 1), "tests": len(records),
        "outcomes": outcomes,
        "files": files, "slowest_tests": tests[:args.top], "date": today, "machine": environment_facts(),
    }
    print(f"\n{len(records)} tests ({', '.join(f'{n} {k}' for k, n in sorted(outcomes.items()))}), exit code "
          f"{exit_code}: {result['wall_s']} s wall, {result['cpu_s']} s CPU "
          f"({result['tests_cpu_s']} s of it in the tests)")
    print(f"{'CPU s':>8} {'own':>7} {'children':>8} {'wall s':>7} {'tests':>5}  file")
    for row in files[:args.top]:
        print(f"{row['total_cpu_s']:8.1f} {row['cpu_s']:7.1f} {row['children_cpu_s']:8.1f} {row['wall_s']:7.1f} "
              f"{row['tests']:5d}  {row['file']}")
    out.write_text(results_json(result))
    print(f"saved {out}")
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
