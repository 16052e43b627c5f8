"""Imports inside autoft only point down: a module uses the layers below its own, never one above, and no
import, lazy ones included, closes a cycle. `python tests/test_layering.py` prints any that do not."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "autoft"

# Lowest first. A module may import from a lower layer, or from its own when that makes no cycle.
LAYERS = {
    # nothing of autoft's but exceptions:
    "exceptions": 1, "config": 1, "storage": 1, "files": 1, "estimate": 1, "selection": 1, "racing": 1, "interrupts": 1,
    "processes": 1, "heartbeat": 1,
    "data": 2, "backbones": 2,
    "cache": 2.5,  # what a run keeps in memory: datasets, device copies, features, pretrained stages
    "probe": 3, "finetune": 3, "checkpoint": 3, "space": 3,
    "records": 4,  # what a study stores
    "plots": 5, "dashboard": 5, "predict": 5,
    "exports": 6, "objective": 6,
    "workers": 7,  # given a study and an objective; never imports study
    "study": 8,
    "report": 9, "runs": 9,
    "cli": 10, "__init__": 10,
}


def autoft_imports(path: Path) -> list[tuple[str, int]]:
    """(autoft module, line) for every import of one in the file, at any depth: lazy imports count too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "autoft":
                    found.append((parts[1] if len(parts) > 1 else "__init__", node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = node.module.split(".")
                if parts[0] != "autoft":
                    continue
                parts = parts[1:]
            else:  # relative: autoft has no subpackages (checked below), so `.x` is autoft.x
                parts = node.module.split(".") if node.module else []
            if parts:
                found.append((parts[0], node.lineno))
            else:  # from . import a, b
                found += [(alias.name, node.lineno) for alias in node.names]
    return sorted(found, key=lambda f: f[1])


def graph() -> dict[str, list[tuple[str, int]]]:
    return {p.stem: autoft_imports(p) for p in sorted(PACKAGE.glob("*.py"))}


def problems() -> list[str]:
    edges = graph()
    out = [f"autoft/{name}.py has no layer in tests/test_layering.py" for name in edges if name not in LAYERS]
    out += [f"autoft/{d.name}/ is a subpackage; the layers cover autoft/*.py only"
            for d in PACKAGE.iterdir() if d.is_dir() and d.name != "__pycache__"]
    for name, imports in edges.items():
        for target, line in imports:
            if target not in LAYERS:
                out.append(f"autoft/{name}.py:{line} imports {target}, which is no module of autoft's layers")
            elif name in LAYERS and (target == name or LAYERS[target] > LAYERS[name]):
                out.append(f"autoft/{name}.py:{line} imports {target}: layer {LAYERS[name]} -> {LAYERS[target]}, up")
    out += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles({n: {t for t, _ in i} for n, i in edges.items()})]
    return out


def cycles(deps: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (depth-first search)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(deps.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(deps):
        if node not in state:
            visit(node, [node])
    return found


def test_every_module_has_a_layer_and_imports_point_down():
    assert problems() == []


def test_the_check_sees_lazy_imports_and_cycles(tmp_path):
    (tmp_path / "m.py").write_text("from . import records\n\ndef f():\n    from .study import run_search\n    import autoft.cli\n")
    assert autoft_imports(tmp_path / "m.py") == [("records", 1), ("study", 4), ("cli", 5)]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


if __name__ == "__main__":
    print("\n".join(problems()) or "no import points up or closes a cycle")
