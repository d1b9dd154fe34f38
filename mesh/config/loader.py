"""Reads Istio-style YAML (text, files, a directory) into validated resources."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mesh.config.destination_rule import DestinationRule, parse_destination_rule
from mesh.config.fields import ConfigError, Node, Where
from mesh.config.gateway import Gateway, parse_gateway
from mesh.config.request_authn import RequestAuthentication, parse_request_authentication
from mesh.config.resource import API_VERSIONS, parse_metadata
from mesh.config.security import (
    AuthorizationPolicy,
    PeerAuthentication,
    parse_authorization_policy,
    parse_peer_authentication,
)
from mesh.config.service_entry import ServiceEntry, parse_service_entry
from mesh.config.virtual_service import VirtualService, parse_virtual_service

Resource = (
    VirtualService
    | DestinationRule
    | PeerAuthentication
    | AuthorizationPolicy
    | ServiceEntry
    | RequestAuthentication
    | Gateway
)
YAML_SUFFIXES = (".yaml", ".yml")
#: Istio's other kinds: refused by name, so a file that carries one is never half applied.
UNSUPPORTED_KINDS = (
    "Sidecar",
    "EnvoyFilter",
    "WorkloadEntry",
    "WorkloadGroup",
    "Telemetry",
    "WasmPlugin",
    "ProxyConfig",
)


@dataclass(frozen=True)
class Document:
    """A validated resource and the YAML it was read from (for dumps)."""

    resource: Resource
    yaml: str

    @property
    def kind(self) -> str:
        return type(self.resource).__name__

    @property
    def ref(self) -> str:
        return self.resource.ref


class _KubernetesLoader(yaml.SafeLoader):
    """YAML as the Kubernetes API reads it: through JSON, which has no time type, so
    ``2024-05-01`` or ``2024-05-01T12:00:00Z`` unquoted is a string (PyYAML would make a
    date of it, and raise ValueError, not a YAML error, for ``2000-13-01``)."""


_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_KubernetesLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _time_as_text(loader: _KubernetesLoader, node: yaml.Node) -> Any:
    """An explicit ``!!timestamp`` stays text too."""
    if not isinstance(node, yaml.ScalarNode):
        raise yaml.constructor.ConstructorError(
            None, None, "a time must be a scalar", node.start_mark
        )
    return loader.construct_scalar(node)


_KubernetesLoader.add_constructor(_TIMESTAMP, _time_as_text)


def _yaml_error(source: str, exc: yaml.YAMLError) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    return ConfigError(f"{source}:{where}: not valid YAML: {problem}")


def _too_deep(source: str) -> ConfigError:
    # PyYAML composes (and dumps) recursively: a few thousand '[' exhaust Python's stack,
    # and its RecursionError is not a YAMLError.
    return ConfigError(f"{source}: not valid YAML: nested too deeply")


def load_yaml(text: str, source: str) -> Any:
    """One YAML document as the Kubernetes API reads it (times stay text), for the other
    files meshserve reads (the gateway's auth file); errors are ConfigErrors naming
    ``source``."""
    try:
        return yaml.load(text, Loader=_KubernetesLoader)
    except yaml.YAMLError as exc:
        raise _yaml_error(source, exc) from exc
    except RecursionError:
        raise _too_deep(source) from None


def parse_yaml(text: str, source: str) -> list[Document]:
    """Every resource in a multi-document YAML text; ``source`` names it in errors."""
    try:
        raw_documents = list(yaml.load_all(text, Loader=_KubernetesLoader))
    except yaml.YAMLError as exc:
        raise _yaml_error(source, exc) from exc
    except RecursionError:
        raise _too_deep(source) from None
    documents = []
    for index, raw in enumerate(raw_documents):
        if raw is None:  # an empty document between '---' separators
            continue
        try:
            resource = parse_resource(raw, source, index + 1)
            documents.append(Document(resource, yaml.safe_dump(raw, sort_keys=False)))
        except RecursionError:
            raise _too_deep(source) from None
    return documents


def parse_resource(raw: Any, source: str, number: int = 1) -> Resource:
    """One resource from one parsed YAML document."""
    node = Node(raw, Where(source, f"document {number}"))
    # ``status`` is the API server's (``kubectl get -o yaml``): accepted, ignored.
    node.mapping(
        ("apiVersion", "kind", "metadata", "spec", "status"),
        required=("apiVersion", "kind", "metadata"),
    )
    kind_node = node.child("kind")
    if kind_node.value in UNSUPPORTED_KINDS:
        kind_node.fail(f"{kind_node.value} is an Istio kind that meshserve does not support")
    kind = kind_node.choice(tuple(API_VERSIONS))
    api_version = node.child("apiVersion").string()
    name_hint = (
        raw.get("metadata", {}).get("name") if isinstance(raw.get("metadata"), dict) else None
    )
    where = Where(
        source,
        f"{kind}/{name_hint}" if isinstance(name_hint, str) else f"{kind} (document {number})",
    )
    node = Node(raw, where)
    if api_version not in API_VERSIONS[kind]:
        node.child("apiVersion").fail(
            f"{kind} needs one of {', '.join(API_VERSIONS[kind])}, got {api_version!r}"
        )
    metadata = parse_metadata(node.child("metadata"), source)
    spec = node.child("spec")
    if spec.value is None:
        spec = Node({}, where, "spec")
    if kind == "VirtualService":
        return parse_virtual_service(spec, metadata)
    if kind == "DestinationRule":
        return parse_destination_rule(spec, metadata, node.child("metadata").child("annotations"))
    if kind == "ServiceEntry":
        return parse_service_entry(spec, metadata)
    if kind == "Gateway":
        return parse_gateway(spec, metadata)
    if kind == "PeerAuthentication":
        return parse_peer_authentication(spec, metadata)
    if kind == "RequestAuthentication":
        return parse_request_authentication(spec, metadata)
    return parse_authorization_policy(spec, metadata)


def yaml_files(path: Path) -> list[Path]:
    """``path`` itself, or the YAML files directly in a directory, sorted.

    Not recursive: sub-folders (such as ``config/examples/``) hold alternatives that
    must not be applied together with the main files. Dot-files (editor swap files,
    ``..data`` of Kubernetes ConfigMaps) are skipped.
    """
    if path.is_dir():
        return sorted(
            p
            for p in path.iterdir()
            if p.suffix in YAML_SUFFIXES and p.is_file() and not p.name.startswith(".")
        )
    if not path.exists():
        raise ConfigError(f"{path}: no such file or directory")
    return [path]


def fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """What changes when any config file does (name, mtime, size), cheap to poll."""
    found = []
    for path in yaml_files(directory):
        try:
            stat = path.stat()
        except OSError:
            continue
        found.append((path.name, stat.st_mtime_ns, stat.st_size))
    return tuple(found)


def load_path(path: Path | str) -> list[Document]:
    """Every resource in a file or in the YAML files of a directory."""
    documents: list[Document] = []
    for file in yaml_files(Path(path)):
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file}: cannot read: {exc}") from exc
        documents.extend(parse_yaml(text, str(file)))
    return documents


def dump_yaml(documents: Iterable[Document]) -> str:
    return "---\n".join(d.yaml for d in documents)
