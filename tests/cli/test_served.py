"""The served-models table of `meshserve models served` and `meshserve status`: pure."""

from __future__ import annotations

from rich.console import Console

from cli.served import served_table
from protos.inference import grpc_service_pb2 as pb


def rendered(index: pb.RepositoryIndexResponse, stats: pb.ModelStatisticsResponse) -> str:
    console = Console(record=True, width=200)
    console.print(served_table(index, stats, "served models"))
    return console.export_text()


def test_each_version_shows_its_fleet_state_summed_inferences_and_reasons() -> None:
    index = pb.RepositoryIndexResponse()
    index.models.add(name="demo", version="1", state="READY")
    index.models.add(name="simple", state="UNAVAILABLE", reason="[::1]:9001: UNAVAILABLE: unloaded")
    stats = pb.ModelStatisticsResponse(
        model_stats=[pb.ModelStatistics(name="demo", version="1", inference_count=184)]
    )
    lines = rendered(index, stats).splitlines()
    demo = next(line for line in lines if "demo" in line)
    assert [cell.strip() for cell in demo.split("│")[1:6]] == ["demo", "1", "READY", "184", ""]
    simple = next(line for line in lines if "simple" in line)
    # Reasons are shown as text, never read as markup (an IPv6 address has brackets).
    cells = [cell.strip() for cell in simple.split("│")[1:6]]
    # No version (a model-level row), no statistics.
    assert cells == ["simple", "-", "UNAVAILABLE", "-", "[::1]:9001: UNAVAILABLE: unloaded"]
