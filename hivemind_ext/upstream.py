"""What this folder copies, subclasses or patches of hivemind, pinned by the digest of its source.

Every module of ``hivemind_ext`` lists the upstream pieces it depends on in a module-level ``UPSTREAM``
mapping (dotted name → the first 16 hex digits of the SHA-256 of ``inspect.getsource`` of it, as of
the supported hivemind version). ``tests/test_hivemind_drift.py`` recomputes every digest: when an
upgrade changes one of those pieces, the test names it, and whoever upgrades reads that upstream change
against our copy or patch before updating the digest (``python -m potluck.hivemind_ext.upstream``
prints the current ones).
"""

from __future__ import annotations

import ast
import gc
import hashlib
import importlib
import inspect
import pkgutil


def source_of(dotted: str) -> str:
    """The installed source of a dotted name (a module-level or nested class or function), read from its
    module's file: what is on disk, whatever a running process may have patched. A name defined several
    times in one scope (a property's getter and setter) gives all its definitions, in order."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        text = inspect.getsource(module)
        scope: list[ast.stmt] = parse_python(text).body
        found: list[ast.stmt] = []
        for name in parts[cut:]:
            found = [
                node
                for node in scope
                if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and node.name == name
            ]
            if not found:
                raise AttributeError(
                    f"{'.'.join(parts[:cut])} has no {dotted[len('.'.join(parts[:cut])) + 1 :]}"
                )
            scope = found[-1].body
        return "".join(_segment(text, node) for node in found)
    raise ImportError(f"cannot import any prefix of {dotted!r}")


def parse_python(text: str) -> ast.Module:
    """``ast.parse`` with the garbage collector held off: CPython 3.11 raises ``SystemError: AST constructor
    recursion depth mismatch`` when a collection that runs finalizers (here: of coroutines and streams left by
    failed p2p calls) lands inside the AST's construction."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(text)
    finally:
        if enabled:
            gc.enable()


def _segment(text: str, node: ast.stmt) -> str:
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    lines = text.splitlines(keepends=True)
    return "".join(lines[first - 1 : node.end_lineno])


def digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def pinned_pieces() -> dict[str, tuple[str, str]]:
    """Every pinned upstream piece: dotted name → (pinned digest, the hivemind_ext module pinning it)."""
    import potluck.hivemind_ext as package

    pieces = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, pinned in getattr(module, "UPSTREAM", {}).items():
            pieces[name] = (pinned, module.__name__)
    return pieces


def drifted(pieces: dict[str, tuple[str, str]], read=source_of) -> list[str]:
    """One line per piece whose source no longer has its pinned digest (``read`` gives a piece's source)."""
    lines = []
    for name, (pinned, module) in sorted(pieces.items()):
        try:
            now = digest(read(name))
        except (ImportError, AttributeError, OSError, TypeError) as e:
            lines.append(f"{name} (pinned by {module}): gone from the installed hivemind ({e})")
            continue
        if now != pinned:
            lines.append(f"{name} (pinned by {module}): source changed, digest {now} != pinned {pinned}")
    return lines


if __name__ == "__main__":
    for name, (pinned, module) in sorted(pinned_pieces().items()):
        print(f"{digest(source_of(name))}  {name}  ({module}; pinned {pinned})")
