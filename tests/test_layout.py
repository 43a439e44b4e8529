"""The layout's promises, checked on the source: which layer may import which, no import cycles, and
hivemind's private names only inside ``hivemind_ext/`` (docs/architecture.md, "Layers")."""

from __future__ import annotations

import ast
from pathlib import Path

import hivemind
import pytest

from potluck.hivemind_ext.upstream import parse_python

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("runtime", "hivemind_ext", "protocols", "coordinator", "peer", "tools")
"""Top-level folders, each the package ``potluck.<folder>``."""

MAY_IMPORT = {
    "runtime": {"runtime"},
    "hivemind_ext": {"hivemind_ext", "runtime"},
    "protocols": {"protocols", "hivemind_ext", "runtime"},
    "coordinator": {"coordinator", "protocols", "hivemind_ext", "runtime"},
    "peer": {"peer", "protocols", "hivemind_ext", "runtime"},
    "tools": set(PACKAGES),
}
"""Which packages each package's modules may import (the coordinator never imports the peer)."""

INSIDE_PEER = {
    "potluck.peer.training": {"potluck.peer.roles", "potluck.peer.shard", "potluck.peer.net"},
    "potluck.peer.averaging": {"potluck.peer.roles", "potluck.peer.shard", "potluck.peer.training"},
    "potluck.peer.net": {"potluck.peer.roles", "potluck.peer.shard", "potluck.peer.averaging"},
    "potluck.peer.shard.server": {"potluck.peer.shard.client", "potluck.peer.roles", "potluck.peer.training"},
    "potluck.peer.shard.client": {"potluck.peer.roles"},
}
"""Inside the peer: prefix → prefixes its modules must not import. Roles (``peer/roles``) compose the
rest; the shard client may use the server's RPC interface (``ShardServicer``'s stubs), not the reverse."""

SCANNED_FOR_PRIVATE_NAMES = ("runtime", "protocols", "coordinator", "peer", "tools", "bench")


def product_modules() -> dict[str, Path]:
    modules = {}
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "generated" in path.parts:
                continue
            name = ".".join(("potluck", *path.relative_to(ROOT).with_suffix("").parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The Potluck modules a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(parse_python(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("potluck"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("potluck"))
    return found


def test_each_package_imports_only_the_layers_below_it():
    modules = product_modules()
    wrong = []
    for name, path in modules.items():
        package = name.split(".")[1]
        for target in imports_of(path, modules):
            if target.split(".")[1] not in MAY_IMPORT[package]:
                wrong.append(f"{path.relative_to(ROOT)} imports {target}")
            for prefix, forbidden in INSIDE_PEER.items():
                if (name == prefix or name.startswith(prefix + ".")) and any(
                    target == f or target.startswith(f + ".") for f in forbidden
                ):
                    wrong.append(f"{path.relative_to(ROOT)} ({prefix}) imports {target}")
    assert not wrong, "\n".join(wrong)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among ``edges`` (module → modules it imports), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_import_cycles():
    modules = product_modules()
    edges = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def defined_private_names(paths) -> set[str]:
    """Private names that files define: functions, classes, variables and ``self.``/``cls.`` attributes."""
    names = set()
    for path in paths:
        for node in ast.walk(parse_python(Path(path).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("self", "cls")
            ):
                names.add(node.attr)
    return {name for name in names if _private(name)}


def private_hivemind_uses(source: str, hivemind_private: set[str], ours: set[str]) -> list[str]:
    """Where ``source`` imports a private hivemind name, reads one as an attribute, or overrides one in
    a subclass of a hivemind class (``line: what``)."""
    tree = parse_python(source)
    uses, from_hivemind = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hivemind":
            for alias in node.names:
                from_hivemind.add(alias.asname or alias.name)
                if _private(alias.name) or any(_private(p) for p in node.module.split(".")):
                    uses.append(f"{node.lineno}: imports {node.module}.{alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in hivemind_private and node.attr not in ours:
            uses.append(f"{node.lineno}: .{node.attr}")
        if isinstance(node, ast.ClassDef):
            bases = {getattr(b, "id", getattr(b, "attr", None)) for b in node.bases}
            if bases & from_hivemind:
                uses.extend(
                    f"{item.lineno}: overrides {node.name}.{item.name}"
                    for item in node.body
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and item.name in hivemind_private
                )
    return uses


@pytest.fixture(scope="module")
def hivemind_private() -> set[str]:
    return defined_private_names(Path(hivemind.__file__).parent.rglob("*.py"))


def scanned_files() -> list[Path]:
    return [
        path
        for top in SCANNED_FOR_PRIVATE_NAMES
        for path in sorted((ROOT / top).rglob("*.py"))
        if "generated" not in path.parts
    ]


def test_private_hivemind_names_are_used_only_in_hivemind_ext(hivemind_private):
    files = scanned_files()
    ours = defined_private_names(files)
    found = [
        f"{path.relative_to(ROOT)}:{use}"
        for path in files
        for use in private_hivemind_uses(path.read_text(), hivemind_private, ours)
    ]
    assert not found, "move these into hivemind_ext/ (with a pinned UPSTREAM entry):\n" + "\n".join(found)


def test_the_scan_catches_each_kind_of_private_use(hivemind_private):
    source = (
        "from hivemind.compression.serialization import _BASE_COMPRESSION_TYPES\n"
        "from hivemind.averaging import DecentralizedAverager\n"
        "class Mine(DecentralizedAverager):\n"
        "    async def _aggregate_with_group(self, group_info):\n"
        "        return self._running_groups\n"
        "def dial(p2p):\n"
        "    return p2p._client\n"
    )
    uses = private_hivemind_uses(source, hivemind_private, ours=set())
    assert sorted(int(u.split(":")[0]) for u in uses) == [1, 4, 5, 7], uses
