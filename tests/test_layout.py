"""The tree's layering, read from the source with `ast`: no import circle anywhere in `otprune/`
or `LLaVA/llava/`, and no module importing a layer above its own (README, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"otprune": ROOT / "otprune", "llava": ROOT / "LLaVA" / "llava"}

# group -> rank. A module may import its own group and groups of a LOWER rank only.
LAYERS = {
    "core": 0,  # otprune/__init__, config, selection, flops, timing, stats, methods/
    "analysis": 1,  # otprune/analysis
    "hf": 1,  # otprune/hf
    "eval": 2,  # otprune/eval
    "serve": 2,  # otprune/serve
    "llava": 3,  # LLaVA/llava: the model package (writes records through otprune.eval)
    "bench": 3,  # otprune/bench
    "commands": 4,  # otprune/commands
    "cli": 5,  # otprune/cli.py, otprune/__main__.py
}


def group(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "llava":
        return "llava"
    if len(parts) > 1 and parts[1] in ("analysis", "hf", "eval", "serve", "bench", "commands"):
        return parts[1]
    if len(parts) > 1 and parts[1] in ("cli", "__main__"):
        return "cli"
    return "core"


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `module` imports (anywhere in the file, lazily or not). `from P import n`
    names module P.n when that is a module, else P; the implicit import of parent packages is left
    out (it cannot close a circle that the explicit edges do not)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                name = f"{base}.{alias.name}"
                found.add(name if name in known else base)
    return {name for name in found if name in known and name != module}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle (a list of modules, first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walker_sees_the_packages():
    edges = graph()
    assert "otprune.methods.otprune" in edges and "llava.model.llava_arch" in edges
    assert "otprune.methods.base" in edges["otprune.methods.otprune"]
    assert "otprune.eval.records" in edges["llava.model.llava_arch"]  # lazy imports count too


def test_find_cycle_names_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_module_imports_a_higher_or_sibling_layer(package):
    wrong = []
    for module, targets in graph().items():
        if not module.startswith(package):
            continue
        mine = group(module)
        for target in targets:
            theirs = group(target)
            if theirs != mine and LAYERS[theirs] >= LAYERS[mine]:
                wrong.append(f"{module} ({mine}) imports {target} ({theirs})")
    assert not wrong, "layer rule broken:\n" + "\n".join(sorted(wrong))


def test_model_loading_lives_outside_the_model_package():
    edges = graph()
    inside = [m for m, targets in edges.items() if m.startswith("llava.model") and "llava.model.builder" in targets
              and m not in ("llava.model", "llava.model.builder")]
    assert not inside, f"modules of llava.model that load models: {inside}"
