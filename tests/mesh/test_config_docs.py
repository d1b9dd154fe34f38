"""docs/configuration.md names every field the config parsers know, accepted or refused."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from mesh.config.resource import SERVER_METADATA

REPO = Path(__file__).resolve().parents[2]
PARSERS = sorted((REPO / "mesh" / "config").glob("*.py"))
#: Keys of the envelope, documented in prose rather than in a field table.
ENVELOPE = {"apiVersion", "kind", "spec"}


def parser_fields() -> set[str]:
    """Every key a ``Node.mapping(...)`` call accepts or refuses by name, and the names in
    module-level tuples the parsers spread into one (``*SERVER_METADATA``)."""
    found: set[str] = set()
    for path in PARSERS:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "mapping"
            ):
                continue
            values = [*node.args[:1], *(k.value for k in node.keywords if k.arg == "unsupported")]
            for value in values:
                for constant in ast.walk(value):
                    if isinstance(constant, ast.Constant) and isinstance(constant.value, str):
                        found.add(constant.value)

    return found | set(SERVER_METADATA)


def test_every_parser_field_is_documented() -> None:
    text = (REPO / "docs" / "configuration.md").read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # fences would pair backticks wrong
    documented = set(re.findall(r"`([^`]+)`", text))
    words = {part for code in documented for part in re.split(r"[.\[\]{}:, ]+", code) if part}
    missing = sorted(f for f in parser_fields() - ENVELOPE if f not in words)
    assert not missing, f"docs/configuration.md does not name: {missing}"
