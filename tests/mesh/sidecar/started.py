"""Starting a sidecar for a test inside an AsyncExitStack, with a workload certificate."""

from __future__ import annotations

from contextlib import AsyncExitStack

from mesh.security.ca import CertificateAuthority
from mesh.security.identity import WorkloadIdentity
from mesh.security.rotation import CertificateSource
from mesh.sidecar.app import Sidecar, SidecarSettings
from registry.store import Store

TD = "cluster.local"


async def started_sidecar(
    stack: AsyncExitStack, settings: SidecarSettings, store: Store, ca: CertificateAuthority
) -> Sidecar:
    """A started sidecar whose certificate from ``ca`` names ``settings.service`` (namespace
    meshserve), drained when ``stack`` closes."""
    identity = WorkloadIdentity(TD, "meshserve", settings.service)
    sidecar = Sidecar(settings, store, certificates=CertificateSource(ca, identity))
    await sidecar.start()
    stack.push_async_callback(sidecar.drain)
    return sidecar
