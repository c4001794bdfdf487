"""The package layout of ARCHITECTURE.md holds: no import circle between kn_edit's modules and no import from a
lower layer to a higher one, counting imports inside functions (imports under ``if TYPE_CHECKING:`` are for type
hints only and are not counted), and few modules directly under ``kn_edit/``."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "kn_edit"

# Each top-level part of kn_edit and its layer; a module may import only its own layer's part or lower layers.
LAYERS = {
    "errors": 0, "progress": 0,
    "storage": 1,
    "models": 2,
    "data": 3, "locating": 3,
    "editing": 4,
    "evaluation": 5, "analysis": 5,
    "cli": 6,
}  # fmt: skip
ROOT_MODULES = {"__init__", "errors", "progress"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = ["kn_edit", *path.with_suffix("").relative_to(ROOT).parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The kn_edit modules ``name`` imports anywhere in its code, resolved to module names."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for stmt in node.body for n in ast.walk(stmt)}  # fmt: skip
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [f"{target}.{a.name}" for a in node.names] + [target]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in mods and "." in candidate:
                candidate = candidate.rsplit(".", 1)[0]
            if candidate in mods and candidate != name:
                found.add(candidate)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_part_of_kn_edit_has_a_layer():
    parts = {_part(m) for m in _modules()} - {None}
    assert parts <= set(LAYERS), f"add {sorted(parts - set(LAYERS))} to LAYERS (and to ARCHITECTURE.md)"


def test_no_import_from_a_lower_layer_to_a_higher_one():
    wrong = []
    for module, deps in _graph().items():
        if module == "kn_edit":  # the public API gathers from every layer
            continue
        for dep in deps:
            if dep == "kn_edit":  # the public API, above every layer but the command line
                if _part(module) != "cli":
                    wrong.append(f"{module} -> kn_edit (import the module that defines the name)")
            elif LAYERS[_part(dep)] > LAYERS[_part(module)] or (
                    LAYERS[_part(dep)] == LAYERS[_part(module)] and _part(dep) != _part(module)):
                wrong.append(f"{module} -> {dep}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if dep.startswith(module + "."):  # a package's __init__ importing its own modules
                continue
            if state.get(dep) == 1 and not module.startswith(dep + "."):
                circles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_few_modules_directly_under_kn_edit():
    top = {p.stem for p in ROOT.glob("*.py")}
    assert top <= ROOT_MODULES, f"modules that belong in a package: {sorted(top - ROOT_MODULES)}"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The graph counts an import made inside a function (the kind that once hid a circle)."""
    graph = _graph()
    assert "kn_edit.models.saving" in graph["kn_edit.models.model"]  # KnModel.save imports it in its body
