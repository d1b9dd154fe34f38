"""Which model versions a policy serves, and which version a request gets. Pure."""

from __future__ import annotations

from collections.abc import Collection, Iterable

from mesh.errors import InvalidArgument, NotFound
from mesh.routing import headers as md
from protos.inference import model_config_pb2 as mc

#: The header a gateway sets to pin a request to a version (Istio-style canary splits).
VERSION_HEADER = md.MODEL_VERSION


def allowed_versions(policy: mc.ModelVersionPolicy, on_disk: Iterable[int]) -> list[int]:
    """The versions ``policy`` serves out of those published, ascending.

    An unset policy is Triton's default: the latest one version.
    """
    available = sorted(set(on_disk))
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return available
    if choice == "specific":
        wanted = set(policy.specific.versions)
        return [v for v in available if v in wanted]
    count = policy.latest.num_versions if choice == "latest" else 1
    return available[-max(count, 1) :] if available else []


def parse_version(model: str, text: str) -> int:
    """A version string from a request as a number; a malformed one is the client's error."""
    if not text.isdigit() or int(text) < 1:
        raise InvalidArgument(f"model {model!r}: version {text!r} is not a positive integer")
    return int(text)


def choose_version(
    model: str,
    requested: str,
    header: str | None,
    servable: Collection[int],
    ready: Collection[int],
) -> int:
    """The version a request runs on.

    ``servable`` are the versions the worker serves (allowed by the policy, or still
    serving while their successor loads); ``ready`` are those loaded at least once
    without error. An explicit version wins; else the ``x-model-version`` header;
    else the highest ready version, or the highest servable one (the caller then
    waits for it to load) when none is ready yet.
    """
    explicit = requested or (header or "")
    if explicit:
        version = parse_version(model, explicit)
        if version not in servable:
            served = ", ".join(str(v) for v in sorted(servable)) or "none"
            raise NotFound(f"model {model!r} has no version {version} (serving: {served})")
        return version
    candidates = [v for v in ready if v in servable] or list(servable)
    if not candidates:
        raise NotFound(f"model {model!r} has no servable version")
    return max(candidates)
