"""deploy/: the Kubernetes manifests validate against the Kubernetes schemas, hold the expected
objects, ship config/ unchanged, issue each pod a certificate for the address it is dialled at,
and probe readiness where a probe can reach."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cli.main import main as meshserve
from mesh.config.loader import parse_yaml
from mesh.security.ca import CA_KEY_FILE, CertificateAuthority
from mesh.security.identity import WorkloadIdentity
from mesh.server.health_port import LIVENESS_SERVICE
from mesh.sidecar.cli import certificates

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), f"{path}: every document is a mapping"
            docs.append(doc)
    return docs


def test_every_manifest_has_the_expected_kinds_in_the_meshserve_namespace() -> None:
    docs = manifests()
    kinds = Counter(d["kind"] for d in docs)
    assert kinds == {
        "Namespace": 1,
        "StatefulSet": 1,
        "Service": 2,
        "Secret": 1,
        "ConfigMap": 1,
        "PersistentVolumeClaim": 1,
        "Deployment": 5,
        "ServiceAccount": 1,
        "Role": 1,
        "RoleBinding": 1,
        "PodDisruptionBudget": 2,
    }
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"]
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "meshserve", doc["metadata"]["name"]


def test_workers_run_beside_their_sidecar_and_the_gateway_reads_the_routing_configmap() -> None:
    deployments = {d["metadata"]["name"]: d for d in manifests() if d["kind"] == "Deployment"}
    assert set(deployments) == {"gateway", "inference", "training", "data", "inference-autoscaler"}
    for name in ("inference", "training", "data"):
        spec = deployments[name]["spec"]["template"]["spec"]
        containers = {c["name"]: c for c in spec["containers"]}
        assert set(containers) == {"worker", "sidecar"}
        assert containers["worker"]["args"][:2] == ["worker", name]
        sidecar = containers["sidecar"]["args"]
        assert sidecar[0] == "sidecar"
        assert sidecar[sidecar.index("--service") + 1] == name
        assert sidecar[sidecar.index("--app") + 1] == "127.0.0.1:9000"
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["routing"]["configMap"]["name"] == "meshserve-routing"
        # The worker's port serves its sidecar only: both read one per-pod secret, which an
        # init container writes into a volume of the pod's own (docs/security.md).
        worker = containers["worker"]["args"]
        secret = worker[worker.index("--sidecar-secret-file") + 1]
        assert sidecar[sidecar.index("--app-secret-file") + 1] == secret
        init = {c["name"]: c for c in spec["initContainers"]}["unit-secret"]
        assert f"write_secret(Path('{secret}'))" in init["command"][-1]
        assert "emptyDir" in volumes["unit"]
        for container in (*containers.values(), init):
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            assert mounts["unit"] == str(Path(secret).parent), container["name"]
    gateway = deployments["gateway"]["spec"]["template"]["spec"]
    assert gateway["containers"][0]["args"][0] == "gateway"
    assert gateway["volumes"][0]["configMap"]["name"] == "meshserve-routing"


def test_routing_configmap_is_config_folder_verbatim_and_valid() -> None:
    (configmap,) = [d for d in manifests() if d["kind"] == "ConfigMap"]
    shipped = {p.name: p.read_text() for p in sorted((ROOT / "config").glob("*.yaml"))}
    assert configmap["data"] == shipped
    for name, text in configmap["data"].items():
        assert parse_yaml(text, name)  # the same validation the gateway runs


def test_dockerfile_installs_cpu_torch_then_the_project_with_meshserve_as_entrypoint() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert text.index("FROM python:") < text.index("--index-url") < text.index('pip install ".')
    assert "download.pytorch.org/whl/cpu" in text
    assert 'ENTRYPOINT ["meshserve"]' in text


def test_the_inference_autoscaler_runs_meshserve_autoscale_with_the_rights_it_uses() -> None:
    from cli.main import build_parser

    docs = {(d["kind"], d["metadata"]["name"]): d for d in manifests()}
    deployment = docs[("Deployment", "inference-autoscaler")]
    spec = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 1  # one decision maker
    (container,) = spec["containers"]
    args = build_parser(container["args"]).parse_args(container["args"])
    assert args.command == "autoscale" and args.target[0] == "inference"
    assert args.deployment == "inference" and args.namespace == "meshserve"
    assert spec["volumes"][0]["configMap"]["name"] == "meshserve-routing"
    # The service account may patch the inference Deployment's scale and annotate pods
    # (cli/autoscale.py's calls), nothing more.
    assert spec["serviceAccountName"] == "inference-autoscaler"
    role = docs[("Role", "inference-autoscaler")]
    rights = {(r["resources"][0], v) for r in role["rules"] for v in r["verbs"]}
    assert rights == {
        ("deployments/scale", "get"),
        ("deployments/scale", "patch"),
        ("pods", "list"),
        ("pods", "patch"),
    }
    binding = docs[("RoleBinding", "inference-autoscaler")]
    assert binding["roleRef"]["name"] == "inference-autoscaler"
    assert binding["subjects"][0]["name"] == "inference-autoscaler"


#: The Kubernetes version whose schemas the manifests are checked against (shipped with
#: kubernetes-validate: no network).
KUBERNETES_VERSION = "1.30.0"


@pytest.mark.parametrize("doc", manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_validates_against_the_kubernetes_schemas(doc: dict[str, Any]) -> None:
    # strict: a misspelt or misplaced field fails, as `kubectl apply --validate=strict` would.
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _deployments() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in manifests() if d["kind"] == "Deployment"}


def _containers(name: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    spec = _deployments()[name]["spec"]["template"]["spec"]
    return spec, {c["name"]: c for c in [*spec.get("initContainers", ()), *spec["containers"]]}


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_each_replicated_role_has_a_disruption_budget_selecting_its_pods() -> None:
    budgets = {d["metadata"]["name"]: d for d in manifests() if d["kind"] == "PodDisruptionBudget"}
    assert set(budgets) == {"gateway", "inference"}
    for name, budget in budgets.items():
        deployment = _deployments()[name]["spec"]
        assert budget["spec"]["selector"]["matchLabels"] == deployment["selector"]["matchLabels"]
        # One pod may go at a time and one stays: below the replicas, above zero.
        assert 0 < budget["spec"]["minAvailable"] < deployment["replicas"]


@pytest.mark.parametrize("name", ["inference", "training", "data"])
def test_sidecars_are_strict_and_ready_when_their_plaintext_health_port_says_so(
    name: str,
) -> None:
    _, containers = _containers(name)
    sidecar = containers["sidecar"]
    args = sidecar["args"]
    assert _flag(args, "--mtls") == "STRICT"
    # The kubelet's grpc probe speaks plaintext: it probes the health-only port, which
    # follows the worker's health, never the mTLS port (where it would always fail).
    health = int(_flag(args, "--health-port"))
    assert sidecar["readinessProbe"]["grpc"]["port"] == health
    assert health != int(_flag(args, "--port"))
    assert {"name": "health", "containerPort": health} in sidecar["ports"]


@pytest.mark.parametrize("name", ["inference", "training", "data"])
def test_a_hung_worker_is_restarted_by_the_kubelets_liveness_probe_on_its_health_port(
    name: str,
) -> None:
    """The worker listens on localhost behind its sidecar's secret, out of the kubelet's
    reach: it answers health alone on a plaintext port, whose liveness service stays SERVING
    while it loads (readiness is the sidecar's probe). Kubernetes' defaults: 10 s x 3."""
    _, containers = _containers(name)
    worker = containers["worker"]
    health = int(_flag(worker["args"], "--health-port"))
    assert health != int(_flag(worker["args"], "--port"))
    assert {"name": "liveness", "containerPort": health} in worker["ports"]
    probe = worker["livenessProbe"]
    assert probe["grpc"] == {"port": health, "service": LIVENESS_SERVICE}
    assert probe["periodSeconds"] * probe["failureThreshold"] == 30
    # A probe's deadline covers a loaded worker's answer (the sidecar's own probe: 2 s).
    assert probe["timeoutSeconds"] >= 2
    # Liveness waits until the worker has started (imports, CUDA): at least a minute.
    startup = worker["startupProbe"]
    assert startup["grpc"] == probe["grpc"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60
    # The sidecar's ports are other ports.
    sidecar_ports = {p["containerPort"] for p in containers["sidecar"]["ports"]}
    assert health not in sidecar_ports


@pytest.mark.parametrize("name", ["gateway", "inference", "training", "data"])
def test_each_pod_gets_a_certificate_for_its_own_ip_and_only_the_issuer_sees_the_ca(
    name: str,
) -> None:
    spec, containers = _containers(name)
    issuer = containers["certs"]
    args = issuer["args"]
    assert args[:2] == ["certs", "issue"] and _flag(args, "--service") == name
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in issuer["env"]}
    assert env["POD_IP"] == "status.podIP"
    assert "$(POD_IP)" in [args[i + 1] for i, a in enumerate(args) if a == "--ip"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["ca"]["secret"]["secretName"] == "meshserve-ca"
    assert volumes["certs"]["emptyDir"]["medium"] == "Memory"
    for container_name, container in containers.items():
        mounted = {m["name"] for m in container.get("volumeMounts", ())}
        assert ("ca" in mounted) == (container_name == "certs"), container_name
    main = containers["sidecar" if name != "gateway" else "gateway"]
    certs_dir = _flag(main["args"], "--certs")
    mount = {m["name"]: m for m in main["volumeMounts"]}["certs"]
    assert mount["mountPath"] == certs_dir and mount["readOnly"]
    # Where the sidecar/gateway reads its files: <certs>/<namespace>/<service>.
    assert _flag(args, "--out") == f"{certs_dir}/meshserve/{name}"
    if name != "gateway":
        # The address the sidecar listens on and registers is the one in the certificate.
        assert _flag(main["args"], "--host") == "$(POD_IP)"


def test_the_issued_pod_certificate_verifies_as_the_pod_ip_the_gateway_dials(
    tmp_path: Path,
) -> None:
    """The inference pod's init container, run as Kubernetes would (its $(VAR)s expanded
    into another folder), then the sidecar's loading of its files: a TLS client that dials
    the pod IP verifies the sidecar's certificate."""
    ca = CertificateAuthority.create("cluster.local")
    ca.save(tmp_path / "ca")
    _, containers = _containers("inference")
    pod_ip = "10.244.1.7"
    expanded = {"$(POD_IP)": pod_ip, "$(POD_NAME)": "inference-7d9f-x2x"}
    args = [expanded.get(a, a) for a in containers["certs"]["args"]]
    args = [a.replace("/etc/meshserve", str(tmp_path)) for a in args]
    assert meshserve(args) == 0
    certs_dir = tmp_path / "certs"
    assert not (certs_dir / CA_KEY_FILE).exists()
    source = certificates(certs_dir, "meshserve", "inference", dt.timedelta(hours=1), host=pod_ip)
    assert source.identity == WorkloadIdentity("cluster.local", "meshserve", "inference")
    # A TLS handshake over a socket pair, the client checking the name it dialled.
    server_side, client_side = socket.socketpair()
    server_context = source.ssl_server_context()
    gateway = ca.issue(WorkloadIdentity("cluster.local", "meshserve", "gateway"))
    gateway.save(tmp_path / "gateway")
    client_context = ssl.create_default_context(cafile=str(tmp_path / "gateway" / "ca.pem"))
    client_context.load_cert_chain(
        tmp_path / "gateway" / "cert.pem", tmp_path / "gateway" / "key.pem"
    )
    failures: list[BaseException] = []

    def serve() -> None:
        try:
            with server_context.wrap_socket(server_side, server_side=True) as tls:
                tls.recv(1)
        except (OSError, ssl.SSLError) as exc:
            failures.append(exc)

    server = threading.Thread(target=serve)
    server.start()
    with client_context.wrap_socket(client_side, server_hostname=pod_ip) as tls:
        tls.sendall(b"x")
    server.join(timeout=10)
    assert not failures
    # Another pod's IP does not verify.
    server_side, client_side = socket.socketpair()
    server = threading.Thread(target=serve)
    server.start()
    with pytest.raises(ssl.SSLCertVerificationError, match=r"10\.244\.9\.9"):
        client_context.wrap_socket(client_side, server_hostname="10.244.9.9")
    client_side.close()
    server.join(timeout=10)


def test_the_image_copies_every_package_the_project_installs() -> None:
    """`meshserve` (cli.main) must be in the image, or no container starts."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    for package in packages:
        assert f"COPY {package} ./{package}" in text, package


def test_every_store_client_reads_the_url_and_optional_credentials_from_the_secret() -> None:
    seen = 0
    for name in _deployments():
        _, containers = _containers(name)
        for container in containers.values():
            env = {
                e["name"]: e.get("valueFrom", {}).get("secretKeyRef")
                for e in container.get("env", ())
            }
            if "MESHSERVE_ES_URL" not in env:
                continue
            seen += 1
            assert env["MESHSERVE_ES_URL"] == {"name": "meshserve-es", "key": "url"}
            for variable, key in (
                ("MESHSERVE_ES_USERNAME", "username"),
                ("MESHSERVE_ES_PASSWORD", "password"),
                ("MESHSERVE_ES_API_KEY", "api-key"),
            ):
                # Optional: absent keys leave the variable unset (an empty user would be sent).
                assert env[variable] == {"name": "meshserve-es", "key": key, "optional": True}
    assert seen == 5  # the gateway, three sidecars and the inference autoscaler
