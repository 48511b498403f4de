"""The package's import rules, read from the source (every import, function-local ones included): no import cycle;
the models, losses and data never import a method; methods never import the trainer or the evaluation. And what a
training process imports at its start, in a process of its own."""

import ast
import importlib.util
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "clip_jax"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the clip_jax modules it imports (`from a import b` counts as a.b when a.b is a module, else a)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of its modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    assert cycle(import_graph()) is None


def under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_layers_import_downwards_only():
    graph = import_graph()
    assert len(graph) > 30  # the walk found the package
    low = ("clip_jax.models", "clip_jax.losses", "clip_jax.data")
    wrong = [(m, t) for m, targets in graph.items() for t in targets
             if (under(m, *low) and under(t, "clip_jax.methods"))
             or (under(m, "clip_jax.methods") and under(t, "clip_jax.train", "clip_jax.evaluate"))]
    assert wrong == []


def test_a_training_process_starts_without_torch_or_scipy(tmp_path):
    """Every `clip-jax` command pays for what its start imports: torch (which tensorboardX imports where it is
    installed, as in this suite's environment) costs 2-3 s, scipy.signal about 1 s and scipy.special with scipy.io
    about 0.4 s on a 2-core machine, and a training run needs none of them unless it reads or makes audio or augments
    images for SLIP."""
    if importlib.util.find_spec("torch") is None:  # as the suite's other torch tests: without it, nothing to hide
        pytest.skip("torch is not installed")
    code = ("import sys; import clip_jax.cli, clip_jax.train.loop; from etils import epath; "
            "from clip_jax.train.metrics import _summary_writer; "
            f"_summary_writer(epath.Path({str(tmp_path)!r}), 0).close(); "
            "print(sorted(m for m in ('torch', 'scipy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
