"""Every command that needs the gateway or the store finds the running ``up`` the same way."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from cli.endpoints import UpStatus, gateway_from_args
from cli.main import build_parser
from cli.supervision.units import UnitState, UnitStatus
from registry.embedded import Endpoint
from registry.locate import NoStore, resolve_url
from registry.state_dir import UpEndpoints, state_dir_from_args


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("MESHSERVE_GATEWAY", "MESHSERVE_ES_URL", "MESHSERVE_STATE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # the fallback .meshserve is this test's own


def running_up(state_dir: Path, gateway: str, es_url: str) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    UpEndpoints(gateway, es_url, os.getpid(), {}).write(state_dir)


def test_components_read_the_addresses_from_the_file_up_writes(tmp_path: Path) -> None:
    # `up` (cli/) writes its units too; the registry's reader, which the gateway's and the
    # sidecar's commands use, takes the addresses and leaves the units to the CLI.
    units = (UnitStatus("store", UnitState.RUNNING, os.getpid(), address="http://127.0.0.1:9"),)
    UpStatus.of_units("127.0.0.1:1111", "http://127.0.0.1:9", units).write(tmp_path)
    assert UpEndpoints.read(tmp_path) == UpEndpoints(
        "127.0.0.1:1111", "http://127.0.0.1:9", os.getpid(), {"store": "http://127.0.0.1:9"}
    )
    assert resolve_url(argparse.Namespace(state_dir=tmp_path)) == "http://127.0.0.1:9"
    status = UpStatus.read(tmp_path)
    assert status is not None and status.units == units


def test_state_dir_is_the_flag_else_the_environment_else_dot_meshserve(tmp_path: Path) -> None:
    flag = argparse.Namespace(state_dir=tmp_path / "flag")
    none = argparse.Namespace(state_dir=None)
    env = {"MESHSERVE_STATE_DIR": str(tmp_path / "env")}
    assert state_dir_from_args(flag, env) == tmp_path / "flag"
    assert state_dir_from_args(none, env) == tmp_path / "env"
    assert state_dir_from_args(none, {}) == Path(".meshserve")
    # A command without the flag (the sidecar's, the gateway's) still gets the default.
    assert state_dir_from_args(argparse.Namespace(), {}) == Path(".meshserve")


# One line per command that talks to the gateway; the flag may come anywhere it is accepted.
GATEWAY_COMMANDS = [
    ["config", "apply", "x.yaml"],
    ["route", "explain", "--model", "m"],
    ["apply", "-f", "x.yaml"],
    ["config", "dump"],
    ["datasets", "list"],
    ["infer", "m", "--data", "[1]"],
    ["call", "inference.GRPCInferenceService/ServerLive"],
    ["bench", "m"],
    ["train", "m", "--dataset", "d"],
]


@pytest.mark.parametrize("command", GATEWAY_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_gateway_commands_find_the_up_of_their_state_dir(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    running_up(tmp_path / "a", "127.0.0.1:1111", "http://127.0.0.1:1")
    running_up(tmp_path / "b", "127.0.0.1:2222", "http://127.0.0.1:2")
    parser = build_parser()

    def gateway(argv: list[str]) -> str:
        args = parser.parse_args(argv)
        given = getattr(args, "address", None) or getattr(args, "gateway", None)
        return gateway_from_args(args, given)

    assert gateway([*command, "--state-dir", str(tmp_path / "a")]) == "127.0.0.1:1111"
    monkeypatch.setenv("MESHSERVE_STATE_DIR", str(tmp_path / "b"))
    assert gateway(command) == "127.0.0.1:2222"
    assert gateway([*command, "--state-dir", str(tmp_path / "a")]) == "127.0.0.1:1111"


def test_datasets_takes_the_state_dir_before_or_after_its_action(tmp_path: Path) -> None:
    running_up(tmp_path / "a", "127.0.0.1:1111", "http://127.0.0.1:1")
    parser = build_parser()
    before = parser.parse_args(["datasets", "--state-dir", str(tmp_path / "a"), "list"])
    after = parser.parse_args(["datasets", "list", "--state-dir", str(tmp_path / "a")])
    assert gateway_from_args(before, before.address) == "127.0.0.1:1111"
    assert gateway_from_args(after, after.address) == "127.0.0.1:1111"


STORE_COMMANDS = [
    ["status"],
    ["models", "list"],
    ["models", "promote", "m", "1"],
    ["models", "rollback", "m"],
    ["registry", "sweep"],
]


@pytest.mark.parametrize("command", STORE_COMMANDS, ids=" ".join)
def test_store_commands_find_the_store_of_their_state_dir(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = build_parser()
    running_up(tmp_path / "a", "127.0.0.1:1111", "http://127.0.0.1:1111")
    # `registry serve-store --data-dir <state>/store` on its own, without an up.
    (tmp_path / "b" / "store").mkdir(parents=True)
    Endpoint("http://127.0.0.1:2222", os.getpid()).write(tmp_path / "b" / "store")

    assert resolve_url(parser.parse_args([*command, "--state-dir", str(tmp_path / "a")])) == (
        "http://127.0.0.1:1111"
    )
    monkeypatch.setenv("MESHSERVE_STATE_DIR", str(tmp_path / "b"))
    assert resolve_url(parser.parse_args(command)) == "http://127.0.0.1:2222"
    # --es and $MESHSERVE_ES_URL still win.
    monkeypatch.setenv("MESHSERVE_ES_URL", "http://127.0.0.1:3333")
    assert resolve_url(parser.parse_args(command)) == "http://127.0.0.1:3333"
    args = parser.parse_args([*command, "--es", "http://127.0.0.1:4444"])
    assert resolve_url(args) == "http://127.0.0.1:4444"


def test_no_store_names_the_state_dir_it_looked_in(tmp_path: Path) -> None:
    args = build_parser().parse_args(["status", "--state-dir", str(tmp_path / "nothing")])
    with pytest.raises(NoStore, match="nothing"):
        resolve_url(args)
