"""Istio YAML fixtures that several tests route with: one copy, so they cannot drift apart.

A fixture that only one test needs (its rules are what that test is about) stays in that
test, where a reader sees it next to the assertions that depend on it.
"""

from __future__ import annotations

#: Parses, but routes to a subset no DestinationRule defines: the merge refuses it.
BAD_SUBSET = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: inference
spec:
  hosts: [inference]
  http:
    - route:
        - destination: {host: inference, subset: nowhere}
"""


def version_subsets(*versions: str) -> str:
    """A DestinationRule for ``inference`` with one subset per version, each selecting
    the instances labelled ``version: <name>`` (how the sample config names subsets)."""
    subsets = "".join(f"    - {{name: {v}, labels: {{version: {v}}}}}\n" for v in versions)
    return (
        "\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: {name: inference}\nspec:\n  host: inference\n  subsets:\n" + subsets
    )


def routed_to(destination: str) -> str:
    """A VirtualService for ``inference`` whose one rule sends everything to
    ``destination`` ("host" or "host/subset")."""
    host, _, subset = destination.partition("/")
    subset_field = f", subset: {subset}" if subset else ""
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: inference}}
spec:
  hosts: [inference]
  http:
    - route: [{{destination: {{host: {host}{subset_field}}}}}]
"""


def lane_subsets(host: str = "inference") -> str:
    """A round-robin DestinationRule for ``host`` with two subsets by the ``lane`` label,
    live and shadow: the split the mirror tests route to and mirror into."""
    return f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {host}}}
spec:
  host: {host}
  trafficPolicy: {{loadBalancer: {{simple: ROUND_ROBIN}}}}
  subsets:
    - {{name: live, labels: {{lane: live}}}}
    - {{name: shadow, labels: {{lane: shadow}}}}
"""
