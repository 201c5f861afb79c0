"""The layout stays easy to see: every module sits in a layer of docs/layout.md and imports only its own layer or
below, no import cycle exists between rece's modules (function-level imports count), no module is over 600 lines and
no function over 80 lines. Reading a name a package's `__init__` defines (`from . import __version__`) imports that
package and counts like any other import."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "rece"
LAYOUT = ROOT / "docs" / "layout.md"


def modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, tree: ast.AST, known: dict[str, Path]) -> set[str]:
    """The rece modules a module imports anywhere in its body: each module named, and the package or module a name is
    read from unless every name read is a submodule (`from . import closed_form` imports `closed_form` only)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            submodules = {f"{source}.{a.name}" for a in node.names} & known.keys()
            found |= submodules
            if source in known and len(submodules) < len(node.names):
                found.add(source)
    return found - {name}


def layers() -> list[tuple[str, list[str]]]:
    """(layer, module paths) of docs/layout.md's table, the lowest layer first; `families/` stands for a package."""
    out = []
    for line in LAYOUT.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3 and "`" in cells[1]:
            out.append((cells[0], re.findall(r"`([^`]+)`", re.sub(r"\([^)]*\)", "", cells[1]))))
    return out


def layer_of(name: str, table: list[tuple[str, list[str]]], path: Path) -> int | None:
    """The index of the layer docs/layout.md puts a module in (None: in none)."""
    rel = "/".join(name.split(".")[1:] + (["__init__"] if path.name == "__init__.py" else []))
    for index, (_, paths) in enumerate(table):
        if any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in paths):
            return index
    return None


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, ast.parse(path.read_text()), known) for name, path in known.items()}


def test_no_import_cycles_and_small_modules_and_functions():
    known = modules()
    imported = graph()
    long_modules, long_functions = [], []
    for name, path in known.items():
        source = path.read_text()
        if source.count("\n") > 600:
            long_modules.append(name)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long_functions.append(f"{name}.{node.name}")
    assert not long_modules and not long_functions

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in imported[start]:
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    cyclic = sorted(name for name in imported if reaches(name, name, set()))
    assert not cyclic, f"modules on an import cycle: {cyclic}"


def test_every_module_imports_only_its_layer_or_below():
    known, table = modules(), layers()
    assert len(table) >= 10, "docs/layout.md's layer table was not found"
    where = {name: layer_of(name, table, path) for name, path in known.items()}
    assert not [n for n, i in where.items() if i is None], "modules docs/layout.md puts in no layer"
    upward = [
        f"{name} ({table[where[name]][0]}) imports {other} ({table[where[other]][0]})"
        for name, others in graph().items()
        for other in sorted(others)
        if where[other] > where[name]
    ]
    assert not upward, upward


def test_the_check_sees_parent_packages_and_upward_imports():
    """The two ways an upward import hid: a name read from the parent package, and a module in too low a layer."""
    known = {"rece": SRC / "__init__.py", "rece.provenance": SRC / "provenance.py", "rece.closed_form": SRC / "x.py"}
    tree = ast.parse("from . import __version__\nfrom . import closed_form\n")
    assert imports("rece.provenance", SRC / "provenance.py", tree, known) == {"rece", "rece.closed_form"}
    tree = ast.parse("def f():\n    from . import closed_form\n")
    assert imports("rece.provenance", SRC / "provenance.py", tree, known) == {"rece.closed_form"}
    table = [("basics", ["provenance", "_version"]), ("pipelines", ["pipelines"]), ("api", ["__init__", "toy/"])]
    assert layer_of("rece", table, SRC / "__init__.py") == 2 and layer_of("rece.toy.evaluate", table, SRC / "x.py") == 2
    assert layer_of("rece.provenance", table, SRC / "provenance.py") == 0 and layer_of("rece.nowhere", table, SRC) is None


def test_generic_modules_ask_the_shapes_door():
    """Outside the toy package (and the demo's grid layout) nothing reads the shapes world's lists or tests a model
    name against "shapes": they ask `rece.toy.door`."""
    model_test = re.compile(r"(model|source|name)\w*\)?\s*[!=]=\s*\"shapes\"")
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        if rel.parts[0] == "toy" or rel.name == "demo.py":
            continue
        text = path.read_text()
        assert "toy.world" not in text and not model_test.search(text), rel
