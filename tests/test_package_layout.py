"""The shape of `utils` (issue 32): layers, no import cycle, no private name across modules, short functions.

A newcomer should be able to walk the package from the bottom up (utils/README.md draws the map). These tests
read the source with `ast` (nothing is imported or run), so they check every import, the lazy ones inside
functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

UTILS = Path(__file__).resolve().parent.parent / "utils"

#: Each module's layer: a module imports only from its own layer or a lower one.
LAYERS: dict[str, int] = {
    # 0: base -- nothing about models yet
    "profiles": 0, "precision": 0, "architectures": 0, "checks": 0, "results": 0,
    # 1: model structure, loading, data
    "structure": 1, "models": 1, "hub": 1, "data": 1,
    # 2: measuring and training any model
    "evaluation": 2, "speed": 2, "training": 2, "plots": 2, "anatomy": 2, "kv_cache": 2,
    # 3: the techniques, one module per chapter's subject
    "depth": 3, "width": 3, "attention": 3,
    "bypass": 3, "bypass_router": 3, "distillation": 3, "lora": 3, "quantization": 3, "extraction": 3,
    "moe": 3, "activations": 3, "bias": 3, "benchmarks": 3, "energy": 3,
    "abilities": 3,  # CH05: instruction following vs reasoning, built on benchmarks
    "specialist": 3,  # CH07's clinical specialist: trained (lora via peft, training), saved, found again (CH09)
    "publish": 3,  # saves any technique's model (a mixture of experts the moe way) with its model card
    # 4: the exercises' checks, which compare a reader's answer with any technique's result
    "exercises": 4,
}
MAX_FUNCTION_LINES = 60
MODULES = sorted(p.stem for p in UTILS.glob("*.py") if p.stem != "__init__")


def _tree(module: str) -> ast.Module:
    return ast.parse((UTILS / f"{module}.py").read_text(encoding="utf-8"))


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported utils module, names, line) for every relative import in ``module``, lazy ones included."""
    found = []
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.append((node.module.split(".")[0], [a.name for a in node.names], node.lineno))
            else:  # from . import speed
                found.extend((a.name, [], node.lineno) for a in node.names)
    return found


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if m not in LAYERS]
    assert not missing, f"add {missing} to LAYERS here and to the map in utils/README.md"


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    bad = [f"{m}.py:{line} ({LAYERS[m]}) imports {target} ({LAYERS[target]})"
           for m in MODULES for target, _, line in _imports(m)
           if m in LAYERS and target in LAYERS and LAYERS[target] > LAYERS[m]]
    assert not bad, "\n".join(bad)


def test_no_private_name_is_imported_from_another_module():
    bad = [f"{m}.py:{line} imports {name} from {target}" for m in MODULES for target, names, line in _imports(m)
           for name in names if name.startswith("_")]
    assert not bad, "make these public where they belong (documented), or move them:\n" + "\n".join(bad)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_there_is_no_import_cycle():
    graph = {m: {target for target, _, _ in _imports(m) if target in MODULES and target != m} for m in MODULES}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _code_lines(node: ast.FunctionDef) -> int:
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


@pytest.mark.parametrize("module", MODULES)
def test_no_function_is_longer_than_a_screen(module):
    long = [f"{node.name} ({_code_lines(node)} lines)" for node in ast.walk(_tree(module))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > MAX_FUNCTION_LINES]
    assert not long, f"utils/{module}.py: break into named steps of at most {MAX_FUNCTION_LINES} lines: {long}"
