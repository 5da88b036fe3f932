"""No import cycle in rpt_data, rpt_train, rpt_common (issue 21: rpt_train.checkpoint -> distributed -> policy ->
checkpoint): every import, function-level ones included, read from the source with ast."""
import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = ("rpt_common", "rpt_data", "rpt_train")


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its source."""
    files = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {}
    for name, f in files.items():
        deps = set()
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, one level up per extra dot
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                deps |= {base} | {f"{base}.{a.name}" for a in node.names}
        graph[name] = {d for d in deps if d in files and d != name and not name.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state, stack, found = {}, [], []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == "open":
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def test_no_import_cycle():
    graph = import_graph()
    assert {"rpt_train.checkpoint", "rpt_train.policy", "rpt_data.pipeline", "rpt_common.models"} <= graph.keys()
    assert "rpt_train.distributed" in graph["rpt_train.checkpoint"]  # the walk sees `from rpt_train import x`
    assert not cycles(graph), " ; ".join(" -> ".join(c) for c in cycles(graph))


def test_the_walk_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
