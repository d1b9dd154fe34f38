"""The relay is the gateway's only data plane: no grpc.aio proxy is left to forward calls."""

from __future__ import annotations

import argparse
import ast
import inspect
from pathlib import Path

from gateway.app import Gateway
from gateway.cli import register
from mesh.routing.methods import FLEET_METHODS
from tests.gateway.harness import REPO

#: What a grpc.aio forwarding path needs: a client channel or a generic handler.
_FORWARDING = ("insecure_channel", "secure_channel", "add_generic_rpc_handlers")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


#: The one gateway module that dials workers with grpc.aio: the fleet's fan-out of calls
#: about the whole inference server (model control, index, statistics), which no single
#: upstream can answer; it forwards none of the data plane's calls (checked below).
_FLEET = REPO / "gateway" / "fleet.py"


def test_the_grpc_aio_proxy_is_gone() -> None:
    assert not (REPO / "gateway" / "proxy.py").exists()
    assert not (REPO / "gateway" / "channels.py").exists()
    for path in [*(REPO / "gateway").glob("*.py"), *(REPO / "mesh" / "proxy").glob("*.py")]:
        if path == _FLEET:
            continue
        imports = _imports(path)
        assert "gateway.proxy" not in imports and "gateway.channels" not in imports, path
        source = path.read_text()
        assert not any(name in source for name in _FORWARDING), path
    # mesh/proxy speaks HTTP/2 itself: no grpc.aio at all.
    for path in (REPO / "mesh" / "proxy").glob("*.py"):
        assert "grpc.aio" not in _imports(path), path


def test_the_fleet_fans_out_control_calls_only() -> None:
    data_plane = {"ModelInfer", "ModelStreamInfer", "ModelMetadata", "ModelConfig"}
    assert not {path.rsplit("/", 1)[1] for path in FLEET_METHODS} & data_plane
    assert all(path.startswith("/inference.GRPCInferenceService/") for path in FLEET_METHODS)


def test_there_is_no_data_plane_switch() -> None:
    assert "data_plane" not in inspect.signature(Gateway).parameters
    subparsers = argparse.ArgumentParser().add_subparsers()
    register(subparsers)
    gateway = subparsers.choices["gateway"]
    options = {o for action in gateway._actions for o in action.option_strings}
    assert "--auth-config" in options and "--data-plane" not in options
