"""A typed reader over parsed YAML that names the file, resource and field in every error."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from mesh.errors import InvalidArgument


class ConfigError(InvalidArgument):
    """A configuration file or resource failed validation.

    The message reads ``<file>: <Kind>/<name>: <field path>: <problem>`` so a user can
    go straight to the line that needs fixing.
    """


@dataclass(frozen=True)
class Where:
    """The file and resource a value belongs to; the prefix of every error message."""

    source: str
    resource: str = ""

    def prefix(self) -> str:
        return f"{self.source}: {self.resource}" if self.resource else self.source


class Node:
    """A YAML value with the path that leads to it.

    Accessors check the type and raise :class:`ConfigError` naming the path, so the
    parsers read like a schema and never repeat error formatting.
    """

    __slots__ = ("path", "value", "where")

    def __init__(self, value: Any, where: Where, path: str = "") -> None:
        self.value = value
        self.where = where
        self.path = path

    # -- errors ---------------------------------------------------------------------------

    def fail(self, problem: str) -> NoReturn:
        location = self.where.prefix()
        raise ConfigError(
            f"{location}: {self.path}: {problem}" if self.path else f"{location}: {problem}"
        )

    def child(self, key: str | int) -> Node:
        if isinstance(key, int):
            return Node(self.value[key], self.where, f"{self.path}[{key}]")
        value = self.value.get(key) if isinstance(self.value, Mapping) else None
        return Node(value, self.where, f"{self.path}.{key}" if self.path else key)

    # -- structure ------------------------------------------------------------------------

    def mapping(
        self,
        allowed: Sequence[str],
        *,
        unsupported: Sequence[str] = (),
        required: Sequence[str] = (),
    ) -> Node:
        """Checks this is a mapping whose keys are all ``allowed``; returns self.

        ``unsupported`` names Istio fields meshserve does not implement: rejecting them
        with their own message beats silently ignoring a policy the user relies on.
        """
        if not isinstance(self.value, Mapping):
            self.fail(f"must be a mapping, got {_kind(self.value)}")
        for key in self.value:
            if not isinstance(key, str):
                self.fail(f"keys must be strings, got {key!r}")
            if key in unsupported:
                self.child(key).fail("is an Istio field that meshserve does not support")
            if key not in allowed:
                self.child(key).fail(f"unknown field (expected one of: {', '.join(allowed)})")
        for key in required:
            if self.value.get(key) is None:
                self.child(key).fail("is required")
        return self

    def has(self, key: str) -> bool:
        return isinstance(self.value, Mapping) and self.value.get(key) is not None

    def items(self) -> Iterator[Node]:
        """The elements of a list (absent → none)."""
        if self.value is None:
            return
        if not isinstance(self.value, list):
            self.fail(f"must be a list, got {_kind(self.value)}")
        for index in range(len(self.value)):
            yield self.child(index)

    def entries(self) -> Iterator[tuple[str, Node]]:
        """The key/value pairs of a mapping (absent → none)."""
        if self.value is None:
            return
        if not isinstance(self.value, Mapping):
            self.fail(f"must be a mapping, got {_kind(self.value)}")
        for key in self.value:
            if not isinstance(key, str):
                self.fail(f"keys must be strings, got {key!r}")
            yield key, Node(self.value[key], self.where, f"{self.path}.{key}" if self.path else key)

    # -- scalars --------------------------------------------------------------------------

    def string(self, *, allow_empty: bool = False) -> str:
        if not isinstance(self.value, str):
            self.fail(f"must be a string, got {_kind(self.value)}")
        if not allow_empty and not self.value:
            self.fail("must not be empty")
        return self.value

    def opt_string(self) -> str | None:
        return None if self.value is None else self.string()

    def boolean(self, default: bool) -> bool:
        if self.value is None:
            return default
        if not isinstance(self.value, bool):
            self.fail(f"must be true or false, got {_kind(self.value)}")
        return self.value

    def integer(self, default: int, low: int, high: int) -> int:
        if self.value is None:
            return default
        # YAML parses ``1.0`` as a float and ``"1"`` as a string: both are user mistakes
        # Istio's schema rejects too; bool is an int subclass and must not pass.
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            self.fail(f"must be an integer in [{low}, {high}], got {_kind(self.value)}")
        if not low <= self.value <= high:
            self.fail(f"must be an integer in [{low}, {high}], got {self.value}")
        return self.value

    def number(self, default: float, low: float, high: float) -> float:
        if self.value is None:
            return default
        if isinstance(self.value, bool) or not isinstance(self.value, int | float):
            self.fail(f"must be a number in [{low:g}, {high:g}], got {_kind(self.value)}")
        value = float(self.value)
        if not (math.isfinite(value) and low <= value <= high):
            self.fail(f"must be a number in [{low:g}, {high:g}], got {self.value}")
        return value

    def choice(self, choices: Sequence[str], default: str | None = None) -> str:
        if self.value is None and default is not None:
            return default
        text = self.string()
        if text not in choices:
            self.fail(f"must be one of {', '.join(choices)}, got {text!r}")
        return text

    def duration(self, default: float | None = None, *, allow_zero: bool = False) -> float:
        """A duration in seconds from ``"1.5s"``, ``"100ms"``, ``"1m30s"`` (Istio's forms)."""
        if self.value is None:
            if default is None:
                self.fail("is required")
            return default
        if not isinstance(self.value, str):
            self.fail(
                f'must be a duration string such as "1.5s" or "100ms", got {_kind(self.value)}'
            )
        seconds = parse_duration(self.value)
        if seconds is None:
            self.fail(f'must be a duration such as "1.5s", "100ms" or "1m30s", got {self.value!r}')
        if seconds < 0 or (seconds == 0 and not allow_zero):
            self.fail(f"must be a positive duration, got {self.value!r}")
        return seconds

    def percentage(self) -> float | None:
        """Istio's ``Percent {value: double}`` in [0, 100]; absent → None."""
        if self.value is None:
            return None
        self.mapping(("value",))
        return self.child("value").number(0.0, 0.0, 100.0)

    def string_list(self) -> tuple[str, ...]:
        return tuple(item.string() for item in self.items())

    def string_map(self) -> dict[str, str]:
        return {key: node.string(allow_empty=True) for key, node in self.entries()}


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|µs|ns)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(text: str) -> float | None:
    """Seconds in a Go/protobuf duration string, or None when it is not one."""
    text = text.strip()
    if not text:
        return None
    total = 0.0
    position = 0
    for part in _DURATION_PART.finditer(text):
        if part.start() != position:
            return None
        total += float(part.group(1)) * _UNIT_SECONDS[part.group(2)]
        position = part.end()
    return total if position == len(text) else None


def format_duration(seconds: float) -> str:
    """The shortest of ``"100ms"`` / ``"1.5s"`` that reads back as ``seconds``."""
    if seconds and seconds < 1 and round(seconds * 1000, 6).is_integer():
        return f"{round(seconds * 1000):d}ms"
    return f"{seconds:g}s"


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__
