"""Import arrows point down: protos ← mesh core ← {gateway, sidecar, workers, registry} ← CLI.

Read from the source (every import statement, including those inside functions), so a
lazy import cannot hide an arrow pointing up.
"""

from __future__ import annotations

import ast
from pathlib import Path

MESH = Path(__file__).resolve().parents[2] / "mesh"
#: The assembly under mesh/: the sidecar, a peer of the gateway. (The CLI, which imports
#: everything, is a top-level folder of its own, cli/.)
ASSEMBLIES = ("sidecar",)


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
        f"{path.relative_to(MESH.parent)} imports {package}"
        for path in paths
        for package in sorted(imported_packages(path) & forbidden)
    ]


def core() -> list[Path]:
    return [
        path
        for path in sorted(MESH.rglob("*.py"))
        if path.relative_to(MESH).parts[0] not in ASSEMBLIES
    ]


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
