"""The daemon's layout: its modules import one another without a cycle, and
the datagram path judges a store's errors without importing a backend."""

from __future__ import annotations

import ast
from pathlib import Path

from nat64ho.daemon import serve

DAEMON = Path(serve.__file__).parent
BACKENDS = {"nat64ho.storage.sqlite", "nat64ho.storage.postgres", "nat64ho.storage.schema"}
BACKENDS |= {"sqlite3", "aiosqlite", "asyncpg"}


def _imports(path: Path) -> set[str]:
    """Modules ``path`` imports, inside functions too, not those only a type
    checker sees (``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    hidden = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_daemon_modules_import_one_another_without_a_cycle():
    graph = {
        f"nat64ho.daemon.{p.stem}": {
            m for m in _imports(p) if m.startswith("nat64ho.daemon.") and m != "nat64ho.daemon"
        }
        for p in DAEMON.glob("*.py")
    }
    assert "nat64ho.daemon.protocol" in graph["nat64ho.daemon.serve"]  # the walk sees imports
    state: dict[str, str] = {}

    def visit(mod: str, path: list[str]) -> None:
        if state.get(mod) == "done":
            return
        assert state.get(mod) != "open", " -> ".join([*path, mod])
        state[mod] = "open"
        for dep in sorted(graph.get(mod, ())):
            visit(dep, [*path, mod])
        state[mod] = "done"

    for mod in sorted(graph):
        visit(mod, [])


def test_the_datagram_path_imports_no_backend():
    for name in ("protocol", "logfile", "metrics", "endpoints", "http", "systemd", "sockets"):
        used = _imports(DAEMON / f"{name}.py")
        assert used & BACKENDS == set(), name
