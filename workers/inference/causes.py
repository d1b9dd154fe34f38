"""Why a load failed, as one bounded line a client can read (type and message of the cause)."""

from __future__ import annotations

import re

import torch

from mesh.errors import MeshError
from workers.model_repo import RepositoryError

#: Longest cause sent to a client: enough for any exception's own message, short enough
#: that a model dumping a tensor or a C++ backtrace into its message stays one line.
MAX_CAUSE_CHARS = 512

#: Torch's C++ errors append "Exception raised from <function> at <file>:<line>" and a
#: native backtrace; neither helps a client, and the backtrace is long.
_CPP_TRAILER = re.compile(r"\n?Exception raised from .*", re.DOTALL)


def describe(exc: BaseException, limit: int = MAX_CAUSE_CHARS) -> str:
    """``"<Type>: <message>"`` of what ``exc`` was caused by, whitespace collapsed, bounded.

    A model's failure reaches the loader wrapped (``ModelError`` from the warm-up pass,
    itself wrapping the ``torch.jit.Error`` of a TorchScript ``raise``): the innermost
    cause is what the model's author needs to see, e.g. ``RuntimeError: stoll``.
    """
    cause = _innermost(exc)
    if isinstance(cause, torch.jit.Error):
        kind, message = _scripted(str(cause))
    else:
        kind, message = type(cause).__name__, str(cause)
    message = " ".join(_CPP_TRAILER.sub("", message).split())
    text = f"{kind}: {message}" if message else kind
    return text if len(text) <= limit else text[: limit - 1] + "…"


def load_failure(exc: BaseException) -> str:
    """The reason a version did not load, as RepositoryIndex and RepositoryModelLoad say it.

    Our own errors already name the problem; anything else gets its cause's type and text.
    """
    if isinstance(exc, MeshError | RepositoryError):
        return str(exc)
    return f"load failed: {describe(exc)}"


def _innermost(exc: BaseException) -> BaseException:
    seen: set[int] = set()
    while exc.__cause__ is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__
    return exc


def _scripted(text: str) -> tuple[str, str]:
    """The type and message of what a TorchScript model raised.

    TorchScript's error text is the interpreter's traceback of the scripted source,
    then ``builtins.<Type>: <message>`` (the message may span lines).
    """
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        found = _RAISED.match(lines[i])
        if found:
            message = "\n".join([found.group(2), *lines[i + 1 :]])
            return found.group(1).rpartition(".")[2], message
    return "TorchScript error", text


_RAISED = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)): ?(.*)$")
