"""The folders are the plan: each package (or top-level module) of autoft is one stage, and its imports only point
down. A module may import from a lower layer, or from its own package when that makes no cycle; no import, lazy
ones included, closes a cycle between modules. `python tests/test_layering.py` prints any that do not."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "autoft"

# Lowest first: a package or top-level module, and its layer.
LAYERS = {
    "exceptions": 0,
    "system": 1,  # files written whole, processes known by identity, signals
    "estimate": 2,
    "config": 2,  # metrics with their intervals; the config and its checks
    "heartbeat": 2,
    "storage": 2,  # Optuna's storages, artifacts and heartbeats, through its public API
    "data": 3,  # images in: scan, decode, the image store, datasets and folds, augmentation
    "backbones": 4,
    "cache": 4,
    "space": 4,  # the registry; what a run keeps in memory; the search space
    "training": 5,  # one fine-tune: the loop, exact probes, finals, inference, checkpoints
    "results": 6,  # what a study keeps and shows: records, exports, summaries, plots, dashboard, predictions
    "study": 7,  # the search: study, objective, pruning, fold racing, workers, progress
    "cli": 8,
    "__init__": 8,
}


def module_of(path: Path) -> str:
    """autoft/results/records.py -> 'results.records'; autoft/__init__.py -> '__init__'."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)


def stage(module: str) -> str:
    return module.split(".")[0]


def autoft_imports(path: Path, module: str | None = None) -> list[tuple[str, int]]:
    """(autoft module, dotted under autoft, line) for every import of one in the file at `module`, at any depth:
    lazy imports count too. `from .x import name` names module x; `from . import x` names module x too."""
    module = module or module_of(path)
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    if module == "__init__":
        package = []
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "autoft":
                    found.append((".".join(parts[1:]) or "__init__", node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = node.module.split(".")
                if parts[0] != "autoft":
                    continue
                base = parts[1:]
            else:
                base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            if node.module is None or (node.level == 0 and not base):  # from . import a, b
                found += [(".".join(base + [alias.name]), node.lineno) for alias in node.names]
            else:
                found.append((".".join(base) or "__init__", node.lineno))
    return sorted(found, key=lambda f: f[1])


def graph() -> dict[str, list[tuple[str, int]]]:
    return {module_of(p): autoft_imports(p) for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def problems() -> list[str]:
    edges = graph()
    out = [f"autoft/{name} has no layer in tests/test_layering.py" for name in edges if stage(name) not in LAYERS]
    for name, imports in edges.items():
        for target, line in imports:
            if target not in edges and target.rsplit(".", 1)[0] not in edges:
                out.append(f"autoft {name}:{line} imports {target}, which is no module of autoft's")
            elif stage(name) in LAYERS and LAYERS[stage(target)] > LAYERS[stage(name)]:
                out.append(
                    f"autoft {name}:{line} imports {target}: layer {LAYERS[stage(name)]} -> {LAYERS[stage(target)]}, up"
                )
            elif (
                stage(target) != stage(name)
                and LAYERS.get(stage(target)) == LAYERS.get(stage(name))
                and "." in name + target
            ):
                out.append(f"autoft {name}:{line} imports {target}: packages side by side do not import each other")
    deps = {n: {t for t, _ in i if t in edges} for n, i in edges.items()}
    out += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(deps)]
    return out


def cycles(deps: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (depth-first search)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(deps.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(deps):
        if node not in state:
            visit(node, [node])
    return found


def test_every_module_has_a_layer_and_imports_point_down():
    assert problems() == []


def test_the_folders_are_the_stages():
    stages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert stages == {"system", "data", "training", "results", "study"}
    assert all((PACKAGE / s / "__init__.py").read_text().startswith('"""') for s in stages)  # each says what it is


def test_the_check_sees_lazy_imports_relative_ones_and_cycles(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(
        "from .. import config\nfrom . import records\n\ndef f():\n    from ..study.run import run_search\n"
        "    import autoft.cli\n    from .plots import points\n"
    )
    assert autoft_imports(f, "results.m") == [
        ("config", 1),
        ("results.records", 2),
        ("study.run", 5),
        ("cli", 6),
        ("results.plots", 7),
    ]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


if __name__ == "__main__":
    print("\n".join(problems()) or "no import points up or closes a cycle")
