"""The import structure: layers point one way (envs < policies < agents < experiments < serving < scripts), no
module imports another's private names, and no two modules import each other, directly or round a circle.

Every module's imports are read with :mod:`ast`, function-level and ``if TYPE_CHECKING:`` ones included (a
lazy or type-only import is still a dependency: the module is written against the other's names).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("envs", "policies", "agents", "experiments", "serving", "scripts")
RANK = {name: i for i, name in enumerate(LAYERS)}

def module_files() -> dict[str, Path]:
    """``deflectlab.<layer>.<module>`` -> file, for every module of every layer folder."""
    out = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(("deflectlab", *parts))] = path
    return out


def imported(tree: ast.AST, known: set[str], package: str) -> set[tuple[str, str]]:
    """``(module, name)`` pairs the tree imports from deflectlab modules (``name`` is ``""`` for a whole module);
    a ``from package import submodule`` counts as importing the submodule."""
    out: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {(a.name, "") for a in node.names if a.name.startswith("deflectlab.")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against the importing package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if not base.startswith("deflectlab"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add((sub, "") if sub in known else (base, a.name))
    return out


def top_level_names(tree: ast.Module) -> set[str]:
    """Names a module binds at its top level (definitions, assignments, imports), ``if`` blocks included."""
    out: set[str] = set()
    stmts = list(tree.body)
    while stmts:
        node = stmts.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.If, ast.Try)):
            stmts += node.body + node.orelse + getattr(node, "finalbody", []) + \
                [s for h in getattr(node, "handlers", []) for s in h.body]
    return out


def graph() -> tuple[dict[str, set[str]], list[str]]:
    """Module -> deflectlab modules it imports; and every import of a private name across modules. An import
    of a module or name that does not exist (a stale path after a move) is an error."""
    files = module_files()
    known = set(files)
    trees = {mod: ast.parse(path.read_text(), str(path)) for mod, path in files.items()}
    edges: dict[str, set[str]] = {m: set() for m in files}
    private = []
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for target, name in imported(trees[mod], known, package):
            if target not in known:
                raise AssertionError(f"{mod} imports {target}, which is no module of the repo")
            if name and name != "*" and name not in top_level_names(trees[target]):
                raise AssertionError(f"{mod} imports {name} from {target}, which has no such name")
            if target != mod:
                edges[mod].add(target)
            if name.startswith("_") and not name.startswith("__"):
                private.append(f"{mod} imports {target}.{name}")
    return edges, private


def layer(mod: str) -> str:
    return mod.split(".")[1]


def circles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(frozenset(comp))
    return found


def test_no_import_from_a_lower_layer_into_a_higher_one():
    edges, _ = graph()
    upward = sorted(f"{m} ({layer(m)}) imports {t} ({layer(t)})" for m, ts in edges.items() for t in ts
                    if RANK[layer(t)] > RANK[layer(m)])
    assert upward == []


def test_no_import_circle():
    edges, _ = graph()
    found = circles(edges)
    assert [sorted(c) for c in found] == []


def test_no_module_imports_another_modules_private_names():
    _, private = graph()
    assert private == []


# -- the checker itself, on small hand-made graphs and sources ----------------------------------------------------
def test_top_level_names_see_definitions_assignments_imports_and_guarded_blocks():
    src = ("import numpy as np\nfrom x import y as z\nA, B = 1, 2\nC: int = 3\ndef f():\n    inner = 1\n"
           "class K:\n    pass\nif True:\n    D = 4\nelse:\n    E = 5\ntry:\n    import json\nexcept ImportError:\n"
           "    json = None\n")
    assert top_level_names(ast.parse(src)) == {"np", "z", "A", "B", "C", "f", "K", "D", "E", "json"}


def test_circle_finder_on_hand_made_graphs():
    assert circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
    two = circles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c", "a"}})
    assert sorted(sorted(c) for c in two) == [["a", "b"], ["c", "d"]]


def test_import_reader_sees_function_level_and_type_checking_imports():
    src = (
        "from typing import TYPE_CHECKING\n"
        "import deflectlab.envs.view\n"
        "if TYPE_CHECKING:\n    from deflectlab.agents.config import TrainConfig\n"
        "def f():\n    from deflectlab.experiments import tuning\n    from deflectlab.envs.metrics import _pcts\n"
    )
    known = {"deflectlab.envs.view", "deflectlab.agents.config", "deflectlab.experiments",
             "deflectlab.experiments.tuning", "deflectlab.envs.metrics"}
    got = imported(ast.parse(src), known, "deflectlab.policies")
    assert got == {("deflectlab.envs.view", ""), ("deflectlab.agents.config", "TrainConfig"),
                   ("deflectlab.experiments.tuning", ""), ("deflectlab.envs.metrics", "_pcts")}
    rel = imported(ast.parse("from ..envs import view\nfrom .heuristics import RoundRobin\n"),
                   known | {"deflectlab.policies.heuristics"}, "deflectlab.policies")
    assert rel == {("deflectlab.envs.view", ""), ("deflectlab.policies.heuristics", "RoundRobin")}
