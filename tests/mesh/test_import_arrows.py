"""Import arrows point down: protos ← mesh core ← {gateway, sidecar, workers, registry} ← CLI.

Read from the source (every import statement, including those inside functions), so a
lazy import cannot hide an arrow pointing up.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MESH = REPO / "mesh"
#: The assembly under mesh/: the sidecar, a peer of the gateway. (The CLI, which imports
#: everything, is a top-level folder of its own, cli/.)
ASSEMBLIES = ("sidecar",)
#: Top-level packages allowed to import the CLI: the CLI itself, and the tools above
#: everything (tests drive commands; benchmarks reuse what `up` writes).
ABOVE_THE_CLI = ("cli", "tests", "bench")


def imported_packages(path: Path) -> set[str]:
    """Top-level packages ``path`` imports (absolute imports only; relative stay inside)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def arrows_up(paths: list[Path], forbidden: frozenset[str]) -> list[str]:
    return [
        f"{path.relative_to(REPO)} imports {package}"
        for path in paths
        for package in sorted(imported_packages(path) & forbidden)
    ]


def core() -> list[Path]:
    return [
        path
        for path in sorted(MESH.rglob("*.py"))
        if path.relative_to(MESH).parts[0] not in ASSEMBLIES
    ]


def outside_the_cli() -> list[Path]:
    """Every module of every top-level package but the CLI and the tools above it."""
    packages = [
        init.parent
        for init in sorted(REPO.glob("*/__init__.py"))
        if init.parent.name not in ABOVE_THE_CLI
    ]
    return [path for package in packages for path in sorted(package.rglob("*.py"))]


def test_the_parser_sees_lazy_and_dotted_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "import os.path\nfrom . import x\n\ndef f() -> None:\n    from gateway.app import G\n"
    )
    assert imported_packages(source) == {"os", "gateway"}


def test_the_mesh_core_imports_no_assembly() -> None:
    paths = core()
    assert MESH / "routing" / "pipeline.py" in paths  # the walk finds the core
    assert arrows_up(paths, frozenset({"gateway", "workers", "registry", "cli"})) == []


def test_the_sidecar_imports_neither_the_gateway_nor_a_worker() -> None:
    # Its peers: what it shares with them (the load report a worker sends, say) lives in
    # the mesh core below all three.
    paths = sorted((MESH / "sidecar").rglob("*.py"))
    assert MESH / "sidecar" / "outbound.py" in paths
    assert arrows_up(paths, frozenset({"gateway", "workers", "cli"})) == []


def test_nothing_outside_the_cli_imports_it() -> None:
    # The components' own commands (gateway/cli.py, mesh/sidecar/cli.py, ...) included:
    # what they share with cli/ (the command error, the state folder) lives below them.
    paths = outside_the_cli()
    for module in ("gateway/cli.py", "mesh/sidecar/cli.py", "registry/store.py"):
        assert REPO / module in paths  # the walk finds every component
    assert not any(path.is_relative_to(REPO / "cli") for path in paths)
    assert arrows_up(paths, frozenset({"cli"})) == []
