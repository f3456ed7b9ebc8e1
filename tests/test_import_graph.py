"""reddino's packages form a DAG: the data flow data → model → train → tune → features → evaluate / infer →
registry, with cli / jobs / demo as shells on top. Every import counts, the ones inside functions too."""

import ast
from pathlib import Path

import reddino

ROOT = Path(reddino.__file__).parent


def _node(module: str) -> str:
    """``reddino.evaluate.runner`` → ``evaluate``; a top-level module (``reddino.paths``) is its own node."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def import_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT.parent).with_suffix("").parts
        is_pkg = rel[-1] == "__init__"
        module = ".".join(rel[:-1] if is_pkg else rel)
        package = module if is_pkg else ".".join(rel[:-1])
        src = _node(module)
        if not src:
            continue  # reddino/__init__.py: the convenience facade over the packages
        for n in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(n, ast.Import):
                targets = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom) and n.level:
                base = package.split(".")[: len(package.split(".")) - n.level + 1]
                targets = [".".join(base + ([n.module] if n.module else []))]
            elif isinstance(n, ast.ImportFrom):
                targets = [n.module or ""]
            else:
                continue
            for t in targets:
                if t.startswith("reddino.") and _node(t) not in ("", src):
                    edges.setdefault(src, set()).add(_node(t))
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(n: str, path: list[str]) -> list[str] | None:
        state[n] = 1
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m] if m in path else path + [n, m]
            if m not in state and (found := visit(m, path + [m])):
                return found
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (found := visit(n, [n])):
            return found
    return None


def test_no_import_cycle_between_packages():
    edges = import_graph()
    assert edges["evaluate"] and "features" in edges["evaluate"]  # the graph is really read
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_features_sits_below_its_consumers():
    edges = import_graph()
    assert not edges.get("features", set()) & {"evaluate", "infer", "registry", "train", "tune", "cli"}
    for consumer in ("evaluate", "infer", "registry"):
        assert "features" in edges[consumer], consumer


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
