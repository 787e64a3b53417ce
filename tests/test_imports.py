"""The package's import graph has no circle: every import of a package module by another (at the top or
inside a function, relative or absolute) is an edge, and the graph is acyclic."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "trainability"


def _name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports}, e.g. "trainability.pipeline": {"trainability.config", ...}."""
    modules = {_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            # the most specific package module each import names (from . import x: the module x)
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = {e for e in edges if not (e != "trainability" and name.startswith(e + "."))} - {"trainability"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each module that lies on one (depth-first search)."""
    found, state = [], {}

    def visit(n, path):
        state[n] = "open"
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                found.append(path[path.index(m):] + [m])
            elif m not in state:
                visit(m, path + [m])
        state[n] = "done"
    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return found


def test_the_graph_sees_the_imports():
    g = import_graph()
    assert "trainability.config" in g["trainability.pipeline"]
    assert "trainability.planning" in g["trainability.pipeline"]   # inside a function


def test_no_import_circle():
    assert cycles(import_graph()) == []
