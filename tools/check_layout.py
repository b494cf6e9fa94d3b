"""The house's rules, checked from the code as it stands (nothing of the project is run):

    python tools/check_layout.py              # exit 0 when every rule holds, else 1 with each breach
    python tools/check_layout.py --longest 10 # also list the longest functions of each package

1. No import circle between the project's modules (function-level imports count: a circle
   hidden in a function is still a circle).
2. No function longer than its package allows (def line to last line): 60 lines in mtl/,
   80 in cluster/.
3. A function-level import of the project's own modules only keeps a heavy optional dependency
   off a path, and says so: a comment on its line or the line above.
4. README.md names every module (its path, ``mtl/train.py``, or its dotted name, ``mtl.train``).
"""
from __future__ import annotations

import argparse
import ast
import io
import sys
import tokenize
from pathlib import Path

PACKAGES = {"mtl": 60, "cluster": 80}       # package -> the longest function it allows


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the checked packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The project module an import of ``name`` loads (the longest known prefix)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, ast.stmt, bool]]:
    """(imported project module, the statement, whether it sits inside a function)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + [base]).strip(".")
                names = [f"{base}.{a.name}" for a in child.names]
                if not any(n in known for n in names):      # names from a module, not modules of a package
                    names.append(base)
            for target in {_resolve(n, known) for n in names} - {None, module}:
                found.append((target, child, in_function))
            visit(child, nested)
    visit(tree, False)
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                out.append(sorted(part))
    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def functions(path: Path) -> list[tuple[str, int, int]]:
    """(qualified name, first line, length) of every function in a file."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((f"{prefix}{child.name}", child.lineno, child.end_lineno - child.lineno + 1))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
    visit(ast.parse(path.read_text(), str(path)), "")
    return found


def comment_lines(path: Path) -> set[int]:
    return {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
            if tok.type == tokenize.COMMENT}


def explained(stmt: ast.stmt, lines: list[str], commented: set[int]) -> bool:
    """A comment on the import's line, or above it in the same run of imports and blank lines
    (one comment may explain a block of lazy imports)."""
    line = stmt.lineno
    while line >= 1:
        if line in commented:
            return True
        line -= 1
        text = lines[line - 1].strip() if line else ""
        if text and not text.startswith(("import ", "from ", "#")):
            return False
    return False


def check(root: Path, longest: int = 0) -> list[str]:
    known = modules(root)
    breaches, graph = [], {}
    readme = (root / "README.md").read_text() if (root / "README.md").exists() else ""
    for module, path in known.items():
        rel = path.relative_to(root).as_posix()
        found = imports(module, path, known)
        graph[module] = {target for target, _, _ in found}
        commented, lines = comment_lines(path), path.read_text().splitlines()
        for target, stmt, in_function in found:
            if in_function and not explained(stmt, lines, commented):
                breaches.append(f"{rel}:{stmt.lineno}: imports {target} inside a function without a comment "
                                "saying which heavy dependency that keeps off a path")
        limit = PACKAGES[module.split(".")[0]]
        for name, line, length in functions(path):
            if length > limit:
                breaches.append(f"{rel}:{line}: {name} is {length} lines, over the {limit} {module.split('.')[0]}/ "
                                "allows")
        if path.name != "__init__.py" and rel not in readme and module not in readme:
            breaches.append(f"{rel}: README.md does not name this module ({rel} or {module})")
    for part in circles(graph):
        breaches.append(f"import circle: {' <-> '.join(part)}")
    if longest:
        for package in PACKAGES:
            rows = sorted(((length, f"{p.relative_to(root).as_posix()}:{name}") for m, p in known.items()
                           if m.split(".")[0] == package for name, _, length in functions(p)), reverse=True)
            print(f"longest functions in {package}/: " + ", ".join(f"{n} {length}" for length, n in rows[:longest]))
    return breaches


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="the project folder")
    p.add_argument("--longest", type=int, default=0, help="also list the N longest functions of each package")
    args = p.parse_args(argv)
    breaches = check(Path(args.root), args.longest)
    for line in breaches:
        print(line)
    print(f"layout: {len(breaches)} breach(es) of the house's rules" if breaches else "layout: every rule holds")
    return 1 if breaches else 0


if __name__ == "__main__":
    raise SystemExit(main())
