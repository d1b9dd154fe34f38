"""The GPU path on a CUDA GPU: graph buckets with padding, instances on their own streams,
double-buffered staging under concurrency, FP16, and no device-wide synchronization.

Skipped where torch sees no GPU (CI); the plan it follows is tested on the CPU in
test_gpu_plan.py. On a GPU machine: ``python -m pytest -q tests/workers/inference -k cuda``.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc.aio
import pytest
import torch

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.inference import model_config_pb2 as mc
from tests.workers.inference.test_cuda import host_calls_within, profile
from tests.workers.inference.test_service import infer_request, output, quarter_inputs
from workers.inference import testing
from workers.inference.gpu.plan import CUDA_GRAPHS_PARAMETER
from workers.inference.gpu.runner import CudaRunner
from workers.inference.model import LoadedModel, load_model
from workers.inference.server import WorkerSettings, run_worker
from workers.model_repo import ModelRepo

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is false)"
)

CUDA = torch.device("cuda")


def publish_mlp(
    path: Path, *, graphs: bool, instances: int, preferred: tuple[int, ...] = ()
) -> torch.nn.Module:
    """The exact-weight MLP (FP32 sums exact in any order), max_batch_size 8."""
    module = testing.seeded(testing.MLP(), 3, exact=True)
    config = testing.model_config(
        "g",
        [("x", testing.FP32, [4])],
        [("y", testing.FP32, [3])],
        max_batch_size=8,
        preferred=preferred,
    )
    config.parameters[CUDA_GRAPHS_PARAMETER].string_value = "true" if graphs else "false"
    config.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_GPU)
    testing.publish(str(path), config, module)
    return module


def load(path: Path, name: str = "g") -> tuple[LoadedModel, CudaRunner]:
    repo = ModelRepo(str(path))
    model = load_model(repo, repo.read_config(name), 1, CUDA)
    assert model.runner is not None
    return model, model.runner


def test_cuda_graph_buckets_pad_each_batch_and_answer_as_the_cpu_does(tmp_path: Path) -> None:
    module = publish_mlp(tmp_path, graphs=True, instances=2, preferred=(2,))
    model, runner = load(tmp_path)
    assert runner.graphs_captured and runner.plan.buckets == (2, 8)
    assert all(set(i.graphs) == {2, 8} for i in runner._instances)
    # A full batch first: the padding rows of the smaller ones after it must not see it.
    for seed, rows in enumerate((8, 1, 3, 2, 7, 8)):
        x = quarter_inputs(seed, rows)
        y = model.run({"x": x}, rows)["y"]
        assert isinstance(y, torch.Tensor)
        assert y.device.type == "cpu" and y.shape == (rows, 3)
        assert torch.equal(y, module(x))


def test_cuda_padding_rows_are_zeros_not_a_previous_batch(tmp_path: Path) -> None:
    publish_mlp(tmp_path, graphs=True, instances=1)
    model, runner = load(tmp_path)
    model.run({"x": torch.full((8, 4), 7.0)}, 8)
    model.run({"x": torch.ones(5, 4)}, 5)
    torch.cuda.synchronize()
    [static] = runner._instances[0].static_inputs
    assert torch.equal(static[:5].cpu(), torch.ones(5, 4))
    assert torch.equal(static[5:8].cpu(), torch.zeros(3, 4))


def test_cuda_instances_issue_work_on_streams_of_their_own(tmp_path: Path) -> None:
    publish_mlp(tmp_path, graphs=False, instances=3)
    model, runner = load(tmp_path)
    streams = [s for i in runner._instances for s in (i.stream, i.copy_stream)]
    handles = {s.cuda_stream for s in streams}
    assert len(handles) == 6
    assert torch.cuda.default_stream(CUDA).cuda_stream not in handles
    # Each instance computes one batch while it stages the next.
    assert model.concurrency == 6


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_cuda_batches_in_flight_on_every_slot_each_get_their_own_answer(
    tmp_path: Path, graphs: bool
) -> None:
    module = publish_mlp(tmp_path, graphs=graphs, instances=2, preferred=(4,))
    model, runner = load(tmp_path)
    assert runner.graphs_captured == graphs
    xs = [quarter_inputs(100 + i, 1 + i % 8) for i in range(96)]
    with ThreadPoolExecutor(max_workers=8) as pool:  # more threads than the 4 slots
        ys = list(pool.map(lambda x: model.run({"x": x}, x.shape[0])["y"], xs))
    for x, y in zip(xs, ys, strict=True):
        assert isinstance(y, torch.Tensor)
        assert torch.equal(y, module(x))


def test_cuda_runner_waits_for_its_batch_alone_never_the_whole_device(tmp_path: Path) -> None:
    publish_mlp(tmp_path, graphs=True, instances=1)
    model, _ = load(tmp_path)
    x = quarter_inputs(5, 4)
    model.run({"x": x}, 4)  # the pinned-memory cache already holds an output block
    torch.cuda.synchronize()
    with profile() as traced, torch.profiler.record_function("run"):
        model.run({"x": x}, 4)
    calls = host_calls_within(traced, "run")
    assert "cudaGraphLaunch" in calls, calls
    waits = [c for c in calls if "Synchronize" in c]
    assert waits == ["cudaEventSynchronize"], calls
    names = [e.name for e in traced.events()]
    copies = [n for n in names if n.startswith(("Memcpy HtoD", "Memcpy DtoH"))]
    # In from pinned staging memory, out into pinned memory: both asynchronous copies.
    assert len(copies) == 2 and all("Pinned" in n for n in copies), sorted(set(names))


def test_cuda_fp16_model_runs_in_graphs_and_matches_a_float_forward(tmp_path: Path) -> None:
    reference = testing.seeded(testing.SmallCNN(), 5)
    half = testing.seeded(testing.SmallCNN(), 5).half()
    config = testing.model_config(
        "half",
        [("image", testing.FP16, [1, 8, 8])],
        [("logits", testing.FP16, [3])],
        max_batch_size=8,
    )
    config.parameters[CUDA_GRAPHS_PARAMETER].string_value = "true"
    testing.publish(str(tmp_path), config, half)
    model, runner = load(tmp_path, "half")
    assert runner.graphs_captured
    images = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(2)).half()
    logits = model.run({"image": images}, 5)["logits"]
    assert isinstance(logits, torch.Tensor) and logits.dtype == torch.float16
    torch.testing.assert_close(logits.float(), reference(images.float()), rtol=2e-2, atol=2e-2)


async def test_cuda_worker_serves_graph_buckets_over_grpc_with_batches_in_flight(
    tmp_path: Path,
) -> None:
    module = publish_mlp(tmp_path, graphs=True, instances=2, preferred=(4,))
    settings = WorkerSettings(str(tmp_path), device="cuda", poll_interval_s=0)
    async with run_worker(settings) as running:
        served = await running.repository.acquire("g", "")
        assert served.model.runner is not None and served.model.runner.graphs_captured
        # Two instances, each staging one batch while it computes another.
        assert served.batcher.policy.instances == 4
        async with grpc.aio.insecure_channel(running.serving.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            xs = [quarter_inputs(i, 1 + i % 3) for i in range(64)]
            responses = await asyncio.gather(
                *(stub.ModelInfer(infer_request("g", {"x": x})) for x in xs)
            )
            stats = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="g"))
    for x, response in zip(xs, responses, strict=True):
        assert torch.equal(output(response, "y"), module(x))
    [figures] = stats.model_stats
    assert figures.inference_count == sum(x.shape[0] for x in xs)
    assert 1 <= figures.execution_count < len(xs)
