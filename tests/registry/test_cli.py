"""``meshserve status`` / ``models`` / ``registry serve-store`` against a real store."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cli.main import main
from registry.catalog import Catalog, ModelVersion
from registry.connect import StoreSettings
from registry.embedded import ENDPOINT_FILE, answers
from registry.instances import Instance, Load, ModelRef
from registry.lease import Registration
from registry.schema import Indices, ensure_schema
from tests.registry.conftest import drop

REPO = Path(__file__).resolve().parents[2]


def table_rows(out: str) -> list[list[str]]:
    """Cells of every rich table row in ``out``."""
    return [
        [cell.strip() for cell in line.strip().strip("│").split("│")]
        for line in out.splitlines()
        if line.lstrip().startswith("│")
    ]


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # rich tables must not elide what we assert on
    monkeypatch.delenv("MESHSERVE_ES_URL", raising=False)


async def _seed(url: str, prefix: str) -> None:
    es = StoreSettings(url).client()
    indices = Indices(prefix)
    try:
        await ensure_schema(es, indices)
        live = Instance(
            "inference",
            "inf-1",
            "10.0.0.5:8001",
            models=(ModelRef("resnet", "2"),),
            load=Load(in_flight=4, queue_depth=2, memory_bytes=3 << 30),
        )
        await Registration(es, indices, live, ttl=300, interval=1).register()
        long_ago = datetime(2020, 1, 1, tzinfo=UTC)
        dead = Instance("data", "data-1", "10.0.0.6:8002")
        await Registration(es, indices, dead, ttl=5, interval=1, clock=lambda: long_ago).register()
        catalog = Catalog(es, indices)
        for v in ("1", "2"):
            await catalog.publish(
                ModelVersion(
                    "resnet",
                    v,
                    f"file:///repo/resnet/{v}",
                    datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=int(v)),
                    metrics={"val_accuracy": 0.5 + int(v) / 10},
                )
            )
        await catalog.promote("resnet", "1")
    finally:
        await es.close()


@pytest.fixture
def prefix(store_url: str) -> Iterator[str]:
    name = f"cli{uuid.uuid4().hex[:10]}"
    yield name

    async def cleanup() -> None:
        es = StoreSettings(store_url).client()
        try:
            await drop(es, Indices(name))
        finally:
            await es.close()

    asyncio.run(cleanup())


def test_status_and_models_commands(
    store_url: str, prefix: str, wide: None, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(_seed(store_url, prefix))
    store = ["--es", store_url, "--prefix", prefix]

    assert main(["status", *store]) == 0
    out = capsys.readouterr().out
    assert "inf-1" in out and "SERVING" in out and "resnet:2" in out
    assert "in-flight 4, queue 2, mem 3.0GiB" in out
    assert "data-1" in out and "EXPIRED" in out
    services = {row[0]: row[1:] for row in table_rows(out) if len(row) == 5}
    # service: serving, draining, not serving, expired
    assert services["inference"] == ["1", "0", "0", "0"]
    assert services["data"] == ["0", "0", "0", "1"]

    assert main(["registry", "sweep", "--retention", "60", *store]) == 0
    assert "removed 1 instance" in capsys.readouterr().out
    assert main(["status", *store]) == 0
    out = capsys.readouterr().out
    assert "inf-1" in out and "data-1" not in out

    assert main(["models", "promote", "resnet", "2", "--expect", "1", *store]) == 0
    assert "production is now version 2" in capsys.readouterr().out
    assert main(["models", "list", *store]) == 0
    listing = [line for line in capsys.readouterr().out.splitlines() if "resnet" in line]
    assert "archived" in listing[0] and "production" in listing[1]
    assert "val_accuracy=0.7" in listing[1]

    # A stale expectation is refused with one line naming the conflict.
    assert main(["models", "promote", "resnet", "1", "--expect", "1", *store]) == 1
    assert "production is 2, expected 1" in capsys.readouterr().err
    assert main(["models", "rollback", "resnet", *store]) == 0
    assert "production is now version 1" in capsys.readouterr().out


def test_status_without_a_store_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wide: None, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["status"]) == 1
    err = capsys.readouterr().err.strip()
    assert "no discovery store" in err and "meshserve up" in err
    assert len(err.splitlines()) == 1


def test_serve_store_runs_in_the_foreground_and_is_found(
    tmp_path: Path, wide: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / ".meshserve" / "store"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli.main",
            "registry",
            "serve-store",
            "--data-dir",
            str(data_dir),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().split()
        assert line[0] == "elasticsearch"
        url = line[1]
        assert answers(url)
        assert json.loads((data_dir / ENDPOINT_FILE).read_text())["url"] == url
        # `meshserve status` without --es finds the local store of this directory.
        monkeypatch.chdir(tmp_path)
        assert main(["status", "--prefix", "fresh"]) == 0
        assert "no instances registered" in capsys.readouterr().out
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert not (data_dir / ENDPOINT_FILE).exists()
        assert not answers(url)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
