"""The workload a policy is evaluated for: its namespace and labels, and selector matching."""

from __future__ import annotations

from dataclasses import dataclass

from mesh.config.resource import DEFAULT_NAMESPACE

Labels = tuple[tuple[str, str], ...]

#: Policies in this namespace apply mesh-wide (Istio's root namespace, ``istio-system``
#: there). meshserve resources default to this namespace, so by default a policy without
#: a selector covers the whole mesh.
ROOT_NAMESPACE = DEFAULT_NAMESPACE
#: Istio's root namespace. Istio's documented mesh-wide policies, and those for its ingress
#: gateway (which runs there), live in it; copied as they are, they would apply to no
#: meshserve workload and silently do nothing. So it is a root namespace here too.
ISTIO_ROOT_NAMESPACE = "istio-system"


def is_root(namespace: str, root_namespace: str = ROOT_NAMESPACE) -> bool:
    """Whether policies in ``namespace`` apply mesh-wide (meshserve's root or Istio's)."""
    return namespace in (root_namespace, ISTIO_ROOT_NAMESPACE)


@dataclass(frozen=True)
class Workload:
    """A service instance as policies see it (a sidecar knows its own)."""

    namespace: str = DEFAULT_NAMESPACE
    labels: Labels = ()

    def selected_by(self, selector: Labels) -> bool:
        """A ``matchLabels`` selector matches when every pair is among the labels."""
        mine = dict(self.labels)
        return all(mine.get(k) == v for k, v in selector)


def applies_to(
    namespace: str, selector: Labels, workload: Workload, root_namespace: str = ROOT_NAMESPACE
) -> bool:
    """Whether a policy in ``namespace`` with ``selector`` applies to ``workload``."""
    if namespace != workload.namespace and not is_root(namespace, root_namespace):
        return False
    return workload.selected_by(selector)
