"""Istio's regular expressions: RE2, compiled once at load time, always matched whole."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import re2


class RegexError(ValueError):
    """Not an RE2 expression (the message is RE2's own)."""


@dataclass(frozen=True)
class Regex:
    """A compiled RE2 expression. Envoy's ``safe_regex`` (which Istio generates) requires
    the whole value to match, never a substring, so only :meth:`fullmatch` is offered."""

    source: str
    ignore_case: bool
    compiled: Any

    def fullmatch(self, value: str) -> bool:
        return self.compiled.fullmatch(value) is not None


def compile_regex(pattern: str, *, ignore_case: bool = False) -> Regex:
    """``pattern`` compiled with RE2's syntax, or :class:`RegexError` saying why not.

    Python's ``re`` would accept look-arounds and back-references that Istio refuses, and
    refuse ``\\pL`` or ``\\z`` that Istio accepts: the same file must mean the same here.
    """
    options = re2.Options()
    options.case_sensitive = not ignore_case
    # Errors come back as the exception; RE2's own log line would only be noise on stderr.
    options.log_errors = False
    try:
        compiled = re2.compile(pattern, options=options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else str(exc)
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise RegexError(f"not an RE2 regular expression: {reason}") from exc
    return Regex(pattern, ignore_case, compiled)
