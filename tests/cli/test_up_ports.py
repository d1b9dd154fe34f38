"""`meshserve up` checks the gateway's port before it starts anything."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.up import check_port_free
from mesh.cli_error import CliError
from registry.state_dir import UP_FILE
from tests.support.up import cli, kill_leftovers, naming


@pytest.fixture
def taken() -> Iterator[int]:
    """A port something listens on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_a_taken_port_is_named_in_full(taken: int) -> None:
    with pytest.raises(CliError) as refused:
        check_port_free("127.0.0.1", taken)
    assert str(refused.value).startswith(f"127.0.0.1:{taken} is already in use")
    assert "--port" in str(refused.value)


def test_a_free_port_passes() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    check_port_free("127.0.0.1", port)  # nothing listens there now: no error


def test_up_fails_at_once_on_a_taken_port_and_starts_nothing(taken: int, tmp_path: Path) -> None:
    state = tmp_path / "state"
    try:
        # Every component asked for: none may start before the port is checked.
        result = cli("up", "--state-dir", str(state), "--port", str(taken), timeout=60)
    finally:
        kill_leftovers(state)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    # One line, whole: the address and "already in use", however wide the terminal.
    assert len(lines) == 1 and f"127.0.0.1:{taken} is already in use" in lines[0], lines
    assert "Traceback" not in result.stderr
    assert "✓" not in result.stdout and "starting" not in result.stdout
    assert not (state / "certs").exists() and not (state / UP_FILE).exists()
    assert not naming(state)


@pytest.mark.parametrize(
    "argv",
    [
        ["up", "--port", "70000"],
        ["up", "--service-port", "-1"],
        ["gateway", "--port", "65536"],
        ["registry", "serve-store", "--port", "99999"],
        ["up", "--port", "http"],
    ],
)
def test_a_port_out_of_range_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``up --port 70000`` ended in a traceback: OverflowError from bind()."""
    from cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "a port is 0-65535" in err or "not a port number: 'http'" in err
