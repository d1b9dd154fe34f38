"""deploy/: the Kubernetes manifests parse, hold the expected objects, and ship config/ unchanged."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from mesh.config.loader import parse_yaml

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
        (init,) = spec["initContainers"]
        assert f"write_secret(Path('{secret}'))" in init["command"][-1]
        assert "emptyDir" in volumes["unit"]
        for container in (*containers.values(), init):
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            assert mounts["unit"] == str(Path(secret).parent), container["name"]
        assert volumes["certs"]["secret"]["secretName"] == f"meshserve-certs-{name}"
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
