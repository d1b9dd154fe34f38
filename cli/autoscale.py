"""``meshserve autoscale``: the autoscaler on Kubernetes, scaling the inference Deployment.

The same decision as ``up --autoscale`` (``mesh.scaling.autoscaler``, policy from the
service's DestinationRule annotations), on the same input (the load the sidecars publish in
the registry), applied through the Kubernetes API with the official client (the ``k8s``
extra): the Deployment's ``scale`` subresource gets the desired replicas. On a scale-down
the pods to remove are the least loaded: they get a lower
``controller.kubernetes.io/pod-deletion-cost`` just before the scale is patched, so the
ReplicaSet deletes them first; each drains on SIGTERM (its sidecar goes DRAINING, the
gateway stops routing to it, in-flight calls finish). Why not the HorizontalPodAutoscaler:
docs/deploy.md, "Autoscaling".
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.cli_error import CliError
from mesh.config.autoscale import AutoscaleSettings
from mesh.scaling.autoscaler import Autoscaler, Bounds, Candidate, Decision, least_loaded
from registry.store_url import store_url

if TYPE_CHECKING:
    from registry.store import Store

log = logging.getLogger(__name__)

#: Kubernetes deletes the pods of a ReplicaSet with the lowest cost first (beta, on by
#: default since 1.22); unset is 0.
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
#: What the pods chosen for a scale-down get: below every other pod's (unset: 0).
CHOSEN_COST = "-1000"


@dataclass(frozen=True)
class Pod:
    name: str
    ip: str
    ready: bool
    #: Creation order (a timestamp): on a tie, the newest goes first.
    created: float


@dataclass(frozen=True)
class ScalePlan:
    """What to do through the API: patch the scale (None: leave it), annotate pods first."""

    replicas: int | None
    deletion_costs: Mapping[str, str] = field(default_factory=dict)


def plan(
    decision: Decision, spec_replicas: int, pods: Sequence[Pod], loads: Mapping[str, int]
) -> ScalePlan:
    """The API calls for ``decision``; ``loads``: in-flight per pod IP (from the registry).

    No scale-down while a pod is not ready: it may be a joining replica, and the ready
    ones are the only ones serving (the same rule as ``up``).
    """
    desired = decision.desired
    if desired > spec_replicas:
        return ScalePlan(desired)
    if desired == spec_replicas or any(not p.ready for p in pods):
        return ScalePlan(None)
    ranked = sorted(pods, key=lambda p: p.created)
    candidates = [Candidate(p.name, loads.get(p.ip, 0), order) for order, p in enumerate(ranked)]
    chosen = least_loaded(candidates, spec_replicas - desired)
    return ScalePlan(desired, {name: CHOSEN_COST for name in chosen})


class KubernetesScaler:
    """The thin shell: the API calls of a plan (blocking; run off the event loop)."""

    def __init__(self, namespace: str, deployment: str, selector: str) -> None:
        try:
            from kubernetes import client, config
        except ImportError:
            raise CliError(
                "meshserve autoscale needs the Kubernetes client: pip install 'meshserve[k8s]'"
            ) from None
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            # Outside a cluster: the user's kubeconfig.
            try:
                config.load_kube_config()  # type: ignore[no-untyped-call]
            except config.ConfigException as exc:
                raise CliError(
                    f"no Kubernetes cluster to scale in: not in a pod, and {exc}"
                ) from None
        self._apps = client.AppsV1Api()
        self._core = client.CoreV1Api()
        self.namespace = namespace
        self.deployment = deployment
        self.selector = selector

    def replicas(self) -> int:
        scale: Any = self._apps.read_namespaced_deployment_scale(self.deployment, self.namespace)
        return int(scale.spec.replicas or 0)

    def pods(self) -> list[Pod]:
        listed: Any = self._core.list_namespaced_pod(self.namespace, label_selector=self.selector)
        pods = []
        for item in listed.items:
            if item.metadata.deletion_timestamp is not None:
                continue  # already going
            conditions = item.status.conditions or []
            ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
            created = item.metadata.creation_timestamp
            pods.append(
                Pod(
                    item.metadata.name,
                    item.status.pod_ip or "",
                    ready,
                    created.timestamp() if created is not None else 0.0,
                )
            )
        return pods

    def apply(self, scale: ScalePlan) -> None:
        for name, cost in scale.deletion_costs.items():
            annotate: dict[str, Any] = {"metadata": {"annotations": {DELETION_COST: cost}}}
            self._core.patch_namespaced_pod(name, self.namespace, annotate)
        if scale.replicas is not None:
            resize: dict[str, Any] = {"spec": {"replicas": scale.replicas}}
            self._apps.patch_namespaced_deployment_scale(self.deployment, self.namespace, resize)


async def _run(args: argparse.Namespace, settings: AutoscaleSettings) -> None:
    from registry.connect import StoreSettings
    from registry.store import open_store

    kube = KubernetesScaler(args.namespace, args.deployment, args.selector or f"app={args.service}")
    scaler = Autoscaler(settings, args.bounds)
    async with open_store(StoreSettings.from_env(url=args.es)) as store:
        while True:
            try:
                await _once(args, store, kube, scaler)
            except Exception as exc:  # the store or the API briefly away: the replicas stay
                log.warning("autoscale %s: %s", args.deployment, exc)
            await asyncio.sleep(args.interval)


async def _once(
    args: argparse.Namespace, store: Store, kube: KubernetesScaler, scaler: Autoscaler
) -> None:
    """One reading, one decision, and the API calls it takes."""
    from registry.directory import read_live
    from registry.instances import utc_now

    snapshot = await read_live(store.es, store.indices, utc_now(), args.service)
    loads = {i.address.rpartition(":")[0]: i.load.in_flight for i in snapshot.instances.values()}
    now = time.monotonic()
    scaler.observe(now, float(sum(loads.values())))
    current = await asyncio.to_thread(kube.replicas)
    decision = scaler.decide(now, current)
    if decision.desired == current:
        return
    pods = await asyncio.to_thread(kube.pods)
    scale = plan(decision, current, pods, loads)
    if scale.replicas is not None:
        log.warning(
            "%s: %d -> %d replicas (load %d%s)",
            args.deployment,
            current,
            scale.replicas,
            sum(loads.values()),
            ", panic" if decision.panic else "",
        )
        await asyncio.to_thread(kube.apply, scale)


def run(args: argparse.Namespace) -> int:
    from cli.up import autoscale_settings

    settings = autoscale_settings(Path(args.config), args.service)
    asyncio.run(_run(args, settings))
    return 0


def _bounds(text: str) -> tuple[str, Bounds]:
    service, sep, bounds = text.partition("=")
    if not sep or not service:
        raise argparse.ArgumentTypeError(f"expected SERVICE=MIN:MAX, got {text!r}")
    try:
        return service, Bounds.parse(bounds)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "autoscale",
        help="scale a Kubernetes Deployment of workers with their live load",
        description="Reads the service's load from the registry once a second and patches "
        "the Deployment's scale (the policy: the meshserve.io/autoscale-* annotations of the "
        "service's DestinationRule; docs/deploy.md).",
    )
    parser.add_argument("target", type=_bounds, metavar="SERVICE=MIN:MAX")
    parser.add_argument("--deployment", default=None, help="default: the service's name")
    parser.add_argument("--namespace", default="meshserve")
    parser.add_argument("--selector", default=None, help="the pods' labels (default app=SERVICE)")
    parser.add_argument("--config", required=True, help="the routing YAML folder")
    parser.add_argument(
        "--es", type=store_url, default=None, help="Elasticsearch URL (else MESHSERVE_ES_URL)"
    )
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between readings")
    parser.set_defaults(handler=_handler)


def _handler(args: argparse.Namespace) -> int:
    args.service, args.bounds = args.target
    args.deployment = args.deployment or args.service
    return run(args)
