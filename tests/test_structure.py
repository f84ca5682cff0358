"""The layering, held by a test: what may import what.

- no import cycles between project modules;
- no module imports another's private name;
- no function-local import of a project module unless the line before says why
  it is lazy (``# lazy: ...``);
- ``common/`` imports no app package; ``client/`` and ``server/`` never import
  each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("common", "client", "server", "simulations", "cli", "benchmarks")
APPS = ("client", "server", "simulations", "cli", "benchmarks")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            rel = path.relative_to(REPO).with_suffix("")
            out[".".join(rel.parts).removesuffix(".__init__")] = path
    return out


def _imports(modules: dict[str, Path]):
    """(module, target module, imported names, line, in a function, lazy comment) rows."""
    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for mod, path in modules.items():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text, str(path))
        in_func = {id(n) for f in ast.walk(tree)
                   if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [(resolve(node.module), [a.name for a in node.names])]
            elif isinstance(node, ast.Import):
                targets = [(resolve(a.name), []) for a in node.names]
            else:
                continue
            for target, names in targets:
                if target and target != mod:
                    before = lines[node.lineno - 2] if node.lineno > 1 else ""
                    yield (mod, target, names, node.lineno, id(node) in in_func,
                           "lazy" in before.lower())


def test_no_cycles_no_private_names_no_undocumented_local_imports():
    modules = _modules()
    rows = list(_imports(modules))
    private = [f"{m}:{n} imports {t}.{x}" for m, t, xs, n, _, _ in rows
               for x in xs if x.startswith("_") and not x.startswith("__")]
    local = [f"{m}:{n} imports {t}" for m, t, _, n, f, lazy in rows if f and not lazy]
    assert not private, private
    assert not local, f"function-local project imports without a '# lazy:' reason: {local}"

    graph: dict[str, set[str]] = {}
    for m, t, *_ in rows:
        graph.setdefault(m, set()).add(t)
    cycles, state = [], {}

    def visit(v: str, stack: list[str]) -> None:
        state[v] = 1
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                cycles.append(" -> ".join(stack[stack.index(w):] + [w]))
            elif w not in state:
                visit(w, [*stack, w])
        state[v] = 2

    for v in sorted(modules):
        if v not in state:
            visit(v, [v])
    assert not cycles, cycles


def test_layers():
    rows = list(_imports(_modules()))
    bad = [f"{m}:{n} imports {t}" for m, t, _, n, _, _ in rows
           if (m.startswith("common") and t.split(".")[0] in APPS)
           or (m.startswith("client") and t.startswith("server"))
           or (m.startswith("server") and t.startswith("client"))]
    assert not bad, bad
