"""The layering, proved from the source: which packages may never reach which.

Every ``import`` in every module counts, lazy ones inside functions and ``TYPE_CHECKING`` ones too,
and so does everything those modules import in turn: a worker that reached ``rallypoint.daemon``
through a third module would be coupled to it all the same. Reading the AST costs no import.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

import rallypoint

ROOT = Path(rallypoint.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _with_parents(name: str) -> set[str]:
    """``a.b.c`` and the packages importing it runs first (``a.b``, ``a``), those that exist here."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & MODULES.keys()


@cache
def imports_of(module: str) -> frozenset[str]:
    """The rallypoint modules ``module`` imports directly, anywhere in its body."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found |= _with_parents(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= _with_parents(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()  # submodules
    return frozenset(found - {module})


@cache
def reachable(module: str) -> frozenset[str]:
    """Every rallypoint module importing ``module`` may import, transitively."""
    seen, todo = set(), [module]
    while todo:
        for nxt in imports_of(todo.pop()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return frozenset(seen - {module})


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _violations(package: str, forbidden: str) -> dict[str, list[str]]:
    return {m: sorted(x for x in reachable(m) if _in(x, forbidden))
            for m in MODULES if _in(m, package) and any(_in(x, forbidden) for x in reachable(m))}


def test_the_walk_sees_imports_lazy_ones_included() -> None:
    assert "rallypoint.protocol.channel" in imports_of("rallypoint.worker.main")
    assert "rallypoint.worker.shards" in imports_of("rallypoint.worker.main")  # imported inside a function
    assert "rallypoint.worker.checkpoint" in imports_of("rallypoint.cli.main")  # likewise
    assert "rallypoint.protocol.keys" in reachable("rallypoint.daemon.daemon")


@pytest.mark.parametrize("package,forbidden", [
    ("rallypoint.worker", "rallypoint.daemon"),   # they talk through rallypoint.protocol only
    ("rallypoint.daemon", "rallypoint.worker"),
    ("rallypoint.cli", "rallypoint.demo"),        # the demo uses rallyctl, never the other way
    ("rallypoint.protocol", "rallypoint.daemon"),  # the neutral home stays neutral
    ("rallypoint.protocol", "rallypoint.worker"),
    ("rallypoint.protocol", "rallypoint.cli"),
    ("rallypoint.groups", "rallypoint.rendezvous"),  # groups execute; stores are injected
    ("rallypoint.groups", "rallypoint.recovery"),
])
def test_never_reaches(package: str, forbidden: str) -> None:
    assert _violations(package, forbidden) == {}
