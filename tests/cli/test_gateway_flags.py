"""``meshserve gateway --labels/--service-port`` and ``up``: what Gateway resources select."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import build_parser
from cli.up import gateway_component
from gateway.app import DEFAULT_PORT, service_port
from mesh.config.views import DEFAULT_INGRESS_LABELS


def test_labels_default_to_the_gateway_pods_and_istio_ingress_labels() -> None:
    args = build_parser(["gateway"]).parse_args(["gateway"])
    assert args.labels == DEFAULT_INGRESS_LABELS
    assert dict(args.labels) == {"app": "gateway", "istio": "ingressgateway"}
    args = build_parser(["gateway"]).parse_args(["gateway", "--labels", "istio=edge,app=x"])
    assert args.labels == (("app", "x"), ("istio", "edge"))


def test_a_label_without_a_value_separator_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser(["gateway"]).parse_args(["gateway", "--labels", "app"])
    assert "'app' is not KEY=VALUE" in capsys.readouterr().err


def test_the_service_port_is_the_listen_port_and_8080_for_any_free_port() -> None:
    assert service_port(9090) == 9090
    assert service_port(0) == DEFAULT_PORT == 8080
    assert service_port(0, 7000) == service_port(9090, 7000) == 7000


def test_up_gives_its_gateway_the_shipped_gateways_port_whatever_it_listens_on(
    tmp_path: Path,
) -> None:
    args = build_parser(["up"]).parse_args(["up", "--port", "9090"])
    flags = gateway_component(args, tmp_path, "http://127.0.0.1:9200").argv
    assert flags[flags.index("--port") + 1] == "9090"
    assert flags[flags.index("--service-port") + 1] == "8080"
