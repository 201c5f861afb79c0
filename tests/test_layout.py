"""The layout stays easy to see: no import cycle between rece's modules (function-level imports count), no module
over 600 lines, no function over 80 lines."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "rece"


def modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, tree: ast.AST, known: dict[str, Path]) -> set[str]:
    """The rece modules a module imports anywhere in its body (a name imported from a package counts if it is a module)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            names = [source] + [f"{source}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known and n != name and n not in ancestors}
    return found


def test_no_import_cycles_and_small_modules_and_functions():
    known = modules()
    graph, long_modules, long_functions = {}, [], []
    for name, path in known.items():
        source = path.read_text()
        tree = ast.parse(source)
        graph[name] = imports(name, path, tree, known)
        if source.count("\n") > 600:
            long_modules.append(name)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long_functions.append(f"{name}.{node.name}")
    assert not long_modules and not long_functions

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph[start]:
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    cyclic = sorted(name for name in graph if reaches(name, name, set()))
    assert not cyclic, f"modules on an import cycle: {cyclic}"


def test_generic_modules_ask_the_shapes_door():
    """Outside the toy package (and the demo's grid layout) nothing reads the shapes world's lists or tests a model
    name against "shapes": they ask `rece.toy.door`."""
    import re

    model_test = re.compile(r"(model|source|name)\w*\)?\s*[!=]=\s*\"shapes\"")
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        if rel.parts[0] == "toy" or rel.name == "demo.py":
            continue
        text = path.read_text()
        assert "toy.world" not in text and not model_test.search(text), rel
