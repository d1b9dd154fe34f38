"""An Elasticsearch URL given as ``--es`` is checked before a command starts anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import main
from registry.store_url import url_problem
from tests.support.up import cli


@pytest.mark.parametrize(
    "url", ["http://localhost:9200", "https://es.example.com", "http://10.0.0.7:9200/prefix"]
)
def test_http_and_https_urls_with_a_host_pass(url: str) -> None:
    assert url_problem(url) is None


@pytest.mark.parametrize(
    "url", ["not a url", "localhost:9200", "ftp://es:21", "http://", "http://es:port", ""]
)
def test_other_urls_are_named(url: str) -> None:
    assert url_problem(url) == f"Elasticsearch URL {url!r} must look like http(s)://host:port"


@pytest.mark.parametrize(
    "command",
    [
        ["up"],
        ["gateway"],
        ["sidecar"],
        ["status"],
        ["autoscale", "--deployment", "d", "--namespace", "n"],
    ],
)
def test_every_es_flag_refuses_a_bad_url_as_a_usage_error(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--es", "not a url"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert (
        "error: argument --es: Elasticsearch URL 'not a url' must look like http(s)://host:port"
    ) in err


def test_up_with_a_bad_url_fails_at_once_and_starts_nothing(tmp_path: Path) -> None:
    """It started the store's certificates, every worker and sidecar and the gateway,
    each of which then failed on the URL, restarted, and failed again."""
    state = tmp_path / "state"
    result = cli("up", "--state-dir", str(state), "--es", "not a url", timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "meshserve up: error: argument --es: Elasticsearch URL 'not a url' must look like "
        "http(s)://host:port"
    )
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not state.exists()
