"""The layer contract of nemo_neo, read off the source (every import, module-level or not).

    python tests/layering.py [ROOT]      # the table: files per layer, upward imports, cycles, ...

Layers, bottom to top: a module may import its own layer's package and any lower layer, never a
higher one. The building blocks (distill, peft, prune, eval, export) are one layer whose packages do
not import each other: each stands on the layers below it alone. Function-local imports of nemo_neo
modules are allowed only where the imported module needs an optional dependency (lm-eval, modelopt,
NeMo, ...), so that importing the caller does not require it.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

LAYERS = (
    ("base", ("nemo_neo", "nemo_neo.errors", "nemo_neo.optional", "nemo_neo._compat", "nemo_neo.chaos")),
    ("parallel", ("nemo_neo.parallel",)),
    ("models", ("nemo_neo.models",)),
    ("checkpoint", ("nemo_neo.checkpoint",)),
    ("data", ("nemo_neo.data",)),
    ("train", ("nemo_neo.train",)),
    ("blocks", ("nemo_neo.distill", "nemo_neo.peft", "nemo_neo.prune", "nemo_neo.eval", "nemo_neo.export")),
    ("workflows", ("nemo_neo.recipes",)),
    ("entry points", ("nemo_neo.cli", "nemo_neo.nemo")),
)
# Packages that are optional extras: a module importing one of them at module level may be imported
# inside a function by others (so that they work without the extra).
OPTIONAL_PACKAGES = {"lm_eval", "modelopt", "nemo", "transformer_engine", "apex", "tensorrt_llm", "datasets", "peft"}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported nemo_neo module
    local: bool  # inside a function body
    line: int


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _package_of(module: str, path: Path) -> list[str]:
    parts = module.split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def read_modules(root: Path) -> dict[str, Path]:
    return {module_name(root, p): p for p in sorted((root / "nemo_neo").rglob("*.py"))}


def _function_nodes(tree: ast.AST) -> set[int]:
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(sub) for sub in ast.walk(node) if sub is not node)
    return inside


def read_imports(root: Path) -> tuple[dict[str, Path], list[Import], dict[str, set[str]]]:
    """All imports between nemo_neo modules, and each module's module-level third-party imports."""
    modules = read_modules(root)
    imports, third_party = [], {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        local_nodes = _function_nodes(tree)
        third_party[name] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                candidates = [[a.name] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = _package_of(name, path)[: len(_package_of(name, path)) - node.level + 1]
                    base_mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    base_mod = node.module or ""
                # `from pkg import submodule` imports the submodule; `from mod import name` the module
                candidates = [[f"{base_mod}.{a.name}", base_mod] for a in node.names]
            else:
                continue
            for options in candidates:
                top = options[-1].split(".")[0]
                if top != "nemo_neo":
                    if id(node) not in local_nodes:
                        third_party[name].add(top)
                    continue
                target = next((o for o in options if o in modules), None)
                if target is None:  # a name re-exported by a package: the nearest existing module
                    target = options[-1]
                    while target not in modules and "." in target:
                        target = target.rsplit(".", 1)[0]
                if target != name:
                    imports.append(Import(name, target, id(node) in local_nodes, node.lineno))
    return modules, sorted(set(imports), key=lambda i: (i.source, i.line, i.target)), third_party


def layer_of(module: str) -> tuple[int, str]:
    """(rank, package) of a module: the longest matching layer prefix."""
    best = None
    for rank, (_, packages) in enumerate(LAYERS):
        for pkg in packages:
            if module == pkg or module.startswith(pkg + "."):
                if best is None or len(pkg) > len(best[1]):
                    best = (rank, pkg)
    if best is None:
        raise KeyError(f"{module} is in no layer of tests/layering.py: add its package to LAYERS")
    return best


def upward_imports(imports: list[Import]) -> list[Import]:
    """Imports of a higher layer, or of a sibling package of the same layer."""
    bad = []
    for imp in imports:
        (src_rank, src_pkg), (dst_rank, dst_pkg) = layer_of(imp.source), layer_of(imp.target)
        if dst_rank > src_rank or (dst_rank == src_rank and dst_pkg != src_pkg and LAYERS[src_rank][0] != "base"):
            bad.append(imp)
    return bad


def cycles(modules: dict[str, Path], imports: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), over every import."""
    graph = {m: set() for m in modules}
    for imp in imports:
        graph[imp.source].add(imp.target)
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def needless_local_imports(imports: list[Import], third_party: dict[str, set[str]]) -> list[Import]:
    """Function-local imports of nemo_neo modules that need no optional dependency."""
    return [imp for imp in imports if imp.local and not (third_party.get(imp.target, set()) & OPTIONAL_PACKAGES)]


def exception_classes(modules: dict[str, Path]) -> list[str]:
    """Classes deriving from an exception (by name), per module: `module.Class`."""
    out = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b) for b in node.bases]
                if any(b.endswith(("Error", "Exception", "Missing")) or b in ("Warning",) for b in bases) or node.name.endswith("Error"):
                    out.append(f"{name}.{node.name}")
    return out


def report(root: Path) -> dict:
    modules, imports, third_party = read_imports(root)
    per_layer = {}
    for name in modules:
        try:
            per_layer.setdefault(LAYERS[layer_of(name)[0]][0], []).append(name)
        except KeyError:
            per_layer.setdefault("(no layer)", []).append(name)
    return {
        "files": len(modules),
        "files_per_layer": {k: len(v) for k, v in per_layer.items()},
        "imports": len(imports),
        "function_local": sum(i.local for i in imports),
        "needless_function_local": needless_local_imports(imports, third_party),
        "upward": upward_imports(imports) if "(no layer)" not in per_layer else None,
        "cycles": cycles(modules, imports),
        "exception_classes": exception_classes(modules),
    }


if __name__ == "__main__":
    result = report(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]))
    for key, value in result.items():
        if isinstance(value, list):
            print(f"{key}: {len(value)}")
            for item in value:
                print(f"    {item}")
        else:
            print(f"{key}: {value}")
