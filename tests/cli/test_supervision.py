"""The supervisor's pure parts: restart policy (table-tested on a fake clock), unit reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from cli.endpoints import UpStatus
from cli.main import build_parser
from cli.restart import find_unit
from cli.supervision.policy import GiveUp, Restart, RestartPolicy, RestartTracker
from cli.supervision.report import units_table
from cli.supervision.units import UnitState, UnitStatus, describe_exit, slug
from mesh.cli_error import CliError

POLICY = RestartPolicy(
    initial_backoff_s=0.5, max_backoff_s=4.0, stable_after_s=30.0, max_restarts=5, window_s=60.0
)


def crash_loop(tracker: RestartTracker, times: list[float], ran_s: float) -> list[object]:
    """Starts at each time, exits (a crash) ``ran_s`` later; the decisions."""
    decisions: list[object] = []
    for at in times:
        tracker.started(at)
        decision = tracker.exited(at + ran_s, requested=False)
        decisions.append(decision.delay_s if isinstance(decision, Restart) else decision)
    return decisions


@pytest.mark.parametrize(
    ("times", "ran_s", "expected"),
    [
        # Backoff doubles from 0.5 s up to the 4 s cap.
        ([0, 2, 4, 8, 14], 0.1, [0.5, 1.0, 2.0, 4.0, 4.0]),
        # A unit that ran stably (>= 30 s) starts over at 0.5 s each time.
        ([0, 100, 200, 300], 40.0, [0.5, 0.5, 0.5, 0.5]),
        # Crashes spread wider than the 60 s window never reach the limit.
        ([0, 25, 50, 75, 100, 125, 150], 0.1, [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]),
    ],
)
def test_backoff_doubles_to_its_cap_and_resets_after_a_stable_run(
    times: list[float], ran_s: float, expected: list[float]
) -> None:
    assert crash_loop(RestartTracker(POLICY), times, ran_s) == expected


def test_the_sixth_crash_within_the_window_fails_the_unit() -> None:
    tracker = RestartTracker(POLICY)
    decisions = crash_loop(tracker, [0, 1, 2, 4, 8, 12], 0.1)
    assert decisions[:5] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert isinstance(decisions[5], GiveUp)
    assert "5 restarts within 60 s" in decisions[5].reason
    assert tracker.restarts == 5


def test_crashes_older_than_the_window_no_longer_count() -> None:
    tracker = RestartTracker(POLICY)
    crash_loop(tracker, [0, 1, 2, 3, 4], 0.1)
    # The five crashes were at 0.1..4.1 s; at 70 s they have all left the window.
    tracker.started(69.0)
    decision = tracker.exited(70.0, requested=False)
    assert isinstance(decision, Restart)


def test_a_requested_stop_restarts_at_once_and_never_counts_toward_the_limit() -> None:
    tracker = RestartTracker(POLICY)
    for at in range(20):  # twenty rolling restarts in 20 s
        tracker.started(float(at))
        decision = tracker.exited(at + 0.5, requested=True)
        assert decision == Restart(at=at + 0.5, delay_s=0.0)
    assert tracker.restarts == 20
    tracker.started(30.0)
    first_crash = tracker.exited(30.5, requested=False)
    assert isinstance(first_crash, Restart) and first_crash.delay_s == 0.5


def test_restart_is_scheduled_on_the_injected_clock() -> None:
    tracker = RestartTracker(POLICY)
    tracker.started(100.0)
    assert tracker.exited(100.2, requested=False) == Restart(at=100.7, delay_s=0.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_backoff_s": 0.0},
        {"initial_backoff_s": 5.0, "max_backoff_s": 1.0},
        {"max_restarts": -1},
        {"window_s": 0.0},
    ],
)
def test_policy_refuses_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RestartPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (-signal.SIGKILL, "killed by SIGKILL"),
        (-signal.SIGTERM, "killed by SIGTERM"),
        (1, "exited with status 1"),
        (0, "exited with status 0"),
        (137, "exited with status 137 (SIGKILL)"),
        # meshserve run killed its worker, silent for its liveness window.
        (124, "exited with status 124 (worker hung)"),
    ],
)
def test_exit_reasons_read_as_words(code: int, words: str) -> None:
    assert describe_exit(code) == words


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("inference worker 1", "inference-1"),
        ("training worker 2", "training-2"),
        ("data worker 1", "data-1"),
        ("store", "store"),
        ("gateway", "gateway"),
    ],
)
def test_unit_slugs(name: str, expected: str) -> None:
    assert slug(name) == expected


UNITS = (
    UnitStatus("store", UnitState.RUNNING, 10, address="http://127.0.0.1:9200"),
    UnitStatus(
        "inference worker 1",
        UnitState.RESTARTING,
        None,
        restarts=2,
        last_exit="killed by SIGKILL",
        restart_at=1000.0,
    ),
    UnitStatus(
        "data worker 1",
        UnitState.FAILED,
        None,
        restarts=5,
        last_exit="exited with status 1",
        failure="5 restarts within 60 s (limit 5)",
    ),
)


def test_restart_finds_units_by_slug_or_printed_name() -> None:
    assert find_unit(UNITS, "inference-1").name == "inference worker 1"
    assert find_unit(UNITS, "inference worker 1").name == "inference worker 1"
    assert find_unit(UNITS, "Inference-Worker-1").name == "inference worker 1"
    with pytest.raises(CliError, match="units: store, inference-1, data-1"):
        find_unit(UNITS, "inference-9")


def test_units_table_shows_state_pid_restarts_and_last_exit() -> None:
    console = Console(width=200, record=True)
    console.print(units_table(UNITS, now=998.5))
    text = console.export_text()
    assert "restarting in 1.5 s" in text
    assert "killed by SIGKILL" in text
    assert "failed (5 restarts within 60 s (limit 5))" in text
    store_row = next(line for line in text.splitlines() if "store" in line)
    assert "running" in store_row and "10" in store_row


def test_up_json_keeps_units_and_old_files_still_read(tmp_path: Path) -> None:
    endpoints = UpStatus("127.0.0.1:1", "http://127.0.0.1:2", os.getpid(), {}, units=UNITS)
    endpoints.write(tmp_path)
    assert UpStatus.read(tmp_path) == endpoints
    raw = json.loads((tmp_path / "up.json").read_text())
    assert raw["units"][1]["slug"] == "inference-1"
    del raw["units"]  # as an `up` from before units wrote it
    (tmp_path / "up.json").write_text(json.dumps(raw))
    old = UpStatus.read(tmp_path)
    assert old is not None and old.units == () and old.gateway == "127.0.0.1:1"


@pytest.mark.parametrize("command", ["gateway", "registry", "run"])
def test_process_commands_parse_with_their_module_alone(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser([command, "--help"]).parse_args([command, "--help"])
    assert exited.value.code == 0
    assert f"meshserve {command}" in capsys.readouterr().out


def test_a_restarted_gateway_or_store_does_not_import_torch() -> None:
    # In a fresh interpreter: this one may have imported torch already.
    probe = (
        "import sys; from cli.main import build_parser; "
        "[build_parser([c]) for c in ('gateway', 'registry')]; "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == "False"
