"""The inference worker on a CUDA GPU: CPU-equal answers, batching, a GPU-byte budget, pinned copies.

Skipped where torch sees no GPU (CI). On a GPU machine:
``python -m pytest -q tests/workers/inference/test_cuda.py``.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
import torch

from mesh.balance.report import LoadReport
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.workers.inference import test_service
from tests.workers.inference.conftest import Client, Template, worker_client
from tests.workers.inference.test_service import infer_request, output, quarter_inputs
from workers.inference import model as model_module
from workers.inference import testing
from workers.inference.model import load_model
from workers.inference.server import WorkerSettings, run_worker
from workers.inference.tensors import encode_bytes_elements
from workers.model_repo import EXPORT_PLATFORM, ModelRepo

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is false)"
)

CUDA = torch.device("cuda")
MiB = 1 << 20


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.fixture
async def cuda_client(model_repo: Path) -> AsyncIterator[Client]:
    async with worker_client(model_repo, "cuda") as connected:
        yield connected


async def test_every_datatype_family_on_cuda_equals_a_cpu_forward(
    cuda_client: Client, template_repo: Template
) -> None:
    modules = template_repo.modules
    stub = cuda_client.stub
    served = await cuda_client.running.repository.acquire("mlp", "")
    scripted: Any = served.model._forward
    assert {p.device.type for p in scripted.parameters()} == {"cuda"}

    # The mlp's quarter-valued weights and inputs add up exactly in FP32 in any order.
    x = quarter_inputs(0, 3)
    response = await stub.ModelInfer(infer_request("mlp", {"x": x}))
    assert torch.equal(output(response, "y"), modules["mlp"](x))

    # cuDNN may run FP32 convolutions in TF32 (torch's default): equal within its precision.
    image = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    response = await stub.ModelInfer(infer_request("cnn", {"image": image}))
    torch.testing.assert_close(
        output(response, "logits"), modules["cnn"](image), rtol=2e-3, atol=2e-3
    )

    ids = torch.tensor([[1, -2, 3, 2**40], [0, 0, 0, 7]])
    response = await stub.ModelInfer(infer_request("intops", {"ids": ids}))
    assert torch.equal(output(response, "total"), ids.sum(dim=1, keepdim=True))
    assert torch.equal(output(response, "doubled"), ids * 2)

    a = torch.tensor([[1.5, -2.0], [65504.0, 2.0**-24]], dtype=torch.float16)
    mask = torch.tensor([[True, False], [True, True]])
    response = await stub.ModelInfer(infer_request("halfmask", {"a": a, "mask": mask}))
    masked = output(response, "masked")
    assert masked.dtype == torch.float16
    assert torch.equal(masked, torch.where(mask, a, torch.zeros_like(a)))

    # BYTES never touch the GPU, but the model around them runs on it.
    text = pb.ModelInferRequest(model_name="textops")
    text.inputs.add(name="text", datatype="BYTES", shape=[2, 1])
    text.raw_input_contents.append(encode_bytes_elements([b"mesh", b"Hi there"]))
    response = await stub.ModelInfer(text)
    assert output(response, "length").tolist() == [[4], [8]]


async def test_errors_streams_and_repository_control_on_cuda(
    cuda_client: Client, template_repo: Template
) -> None:
    """The CPU suite's error, stream and unload/load scenarios, against a CUDA worker."""
    await test_service.test_every_error_status(cuda_client)
    await test_service.test_stream_infer_answers_each_request_and_survives_a_bad_one(
        cuda_client, template_repo
    )
    await test_service.test_repository_index_unload_and_load(cuda_client)


async def test_cuda_batches_equal_unbatched_runs(model_repo: Path, template_repo: Template) -> None:
    # A long queue delay lets the batch form however slowly the requests arrive.
    repo = ModelRepo(str(model_repo))
    repo.write_config("mlp", testing.mlp_config(queue_delay_us=200_000))
    repo.write_config("cnn", testing.cnn_config(queue_delay_us=200_000))
    xs = [quarter_inputs(seed, 1 + seed % 3) for seed in range(24)]
    images = [
        torch.randn(1 + seed % 3, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        for seed in range(24)
    ]
    settings = WorkerSettings(str(model_repo), device="cuda", poll_interval_s=0)
    async with run_worker(settings) as running:
        async with grpc.aio.insecure_channel(running.serving.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            batched_y, batched_logits = await asyncio.gather(
                asyncio.gather(*(stub.ModelInfer(infer_request("mlp", {"x": x})) for x in xs)),
                asyncio.gather(
                    *(stub.ModelInfer(infer_request("cnn", {"image": i})) for i in images)
                ),
            )
            stats = await stub.ModelStatistics(pb.ModelStatisticsRequest())
            # One at a time: every request is its own forward pass on the same GPU model.
            alone_logits = [
                await stub.ModelInfer(infer_request("cnn", {"image": i})) for i in images
            ]
    module = template_repo.modules["mlp"]
    for x, response in zip(xs, batched_y, strict=True):
        assert torch.equal(output(response, "y"), module(x))  # bit for bit
    for batched, alone in zip(batched_logits, alone_logits, strict=True):
        # Different batch sizes may pick different kernels: equal within float rounding.
        torch.testing.assert_close(
            output(batched, "logits"), output(alone, "logits"), rtol=1e-4, atol=1e-5
        )
    by_name = {s.name: s for s in stats.model_stats}
    for name, requests in (("mlp", xs), ("cnn", images)):
        figures = by_name[name]
        assert figures.inference_count == sum(r.shape[0] for r in requests)
        assert 1 <= figures.execution_count < len(requests)
        assert max(b.batch_size for b in figures.batch_stats) > 3


class Offset(torch.nn.Module):
    """FP32 [B, 4] -> [B, 4]: creates a tensor in forward, which torch.export pins to a device."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 + torch.arange(x.shape[1], dtype=x.dtype)


async def test_torch_export_archives_run_on_cuda(tmp_path: Path) -> None:
    repo = ModelRepo(str(tmp_path))
    modules: dict[str, torch.nn.Module] = {
        "offset": Offset(),
        "exported_mlp": testing.seeded(testing.MLP(), 4, exact=True),
    }
    for name, module in modules.items():
        config = testing.model_config(
            name,
            [("x", testing.FP32, [4])],
            [("y", testing.FP32, [4 if name == "offset" else 3])],
            platform=EXPORT_PLATFORM,
        )
        repo.write_config(name, config)
        repo.publish_version(name, {"model.pt2": testing.export_bytes(module, torch.zeros(2, 4))})
    settings = WorkerSettings(str(tmp_path), device="cuda", poll_interval_s=0)
    async with run_worker(settings) as running:
        async with grpc.aio.insecure_channel(running.serving.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            x = quarter_inputs(11, 5)
            for name, module in modules.items():
                served = await running.repository.acquire(name, "")
                graph: Any = served.model._forward
                assert {t.device.type for t in graph.state_dict().values()} <= {"cuda"}
                response = await stub.ModelInfer(infer_request(name, {"x": x}))
                assert torch.equal(output(response, "y"), module(x))


def _publish_wide(repo: Path, name: str, seed: int) -> torch.nn.Module:
    """An ~8 MiB FP32 MLP: large enough that GPU allocator noise cannot hide it."""
    module = testing.seeded(testing.MLP(hidden=2048, features=1024), seed)
    config = testing.model_config(
        name, [("x", testing.FP32, [1024])], [("y", testing.FP32, [3])], max_batch_size=8
    )
    testing.publish(str(repo), config, module)
    return module


async def test_budget_counts_gpu_bytes_and_eviction_frees_them(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    modules = {name: _publish_wide(repo, name, seed) for seed, name in enumerate(("wa", "wb"))}
    size = parameter_bytes(modules["wa"])
    assert size == parameter_bytes(modules["wb"]) and size > 8 * MiB
    budget = size + size // 2  # room for one version, not two
    settings = WorkerSettings(
        str(repo), device="cuda", poll_interval_s=0, memory_budget_bytes=budget
    )
    async with run_worker(settings) as running:
        cache = running.repository.cache

        def weights_on_gpu() -> list[weakref.ref[torch.Tensor]]:
            [served] = cache.values()
            scripted: Any = served.model._forward
            params = list(scripted.parameters())
            assert {p.device.type for p in params} == {"cuda"}
            return [weakref.ref(p) for p in params]

        async with grpc.aio.insecure_channel(running.serving.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def infer(name: str) -> LoadReport:
                x = torch.randn(2, 1024, generator=torch.Generator().manual_seed(9))
                call = stub.ModelInfer(infer_request(name, {"x": x}))
                response = await call
                torch.testing.assert_close(
                    output(response, "y"), modules[name](x), rtol=1e-3, atol=1e-3
                )
                return LoadReport.from_metadata(await call.trailing_metadata() or ())

            # Both loaded at start, one after the other: the first was evicted for the second.
            [(last, _)] = cache.loaded_keys()
            assert cache.evictions == 1
            evicted = "wa" if last == "wb" else "wb"
            for name in (evicted, last, evicted):
                resident = weights_on_gpu()
                freed_before = torch.cuda.memory_stats()["allocated_bytes.all.freed"]
                report = await infer(name)
                assert report.loaded_versions == (f"{name}:1",)
                assert report.memory_bytes == size and report.memory_budget_bytes == budget
                # The evicted version's weights left the GPU, not just the cache's books:
                # its tensors are gone and the allocator took their bytes back.
                assert all(ref() is None for ref in resident)
                freed = torch.cuda.memory_stats()["allocated_bytes.all.freed"] - freed_before
                assert freed >= size, freed
            stats = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=evicted, version="1"))
            [usage] = stats.model_stats[0].memory_usage
            assert (usage.type, usage.id, usage.byte_size) == ("GPU", 0, size)
            assert cache.evictions == 4


def test_gpu_bytes_of_a_load_ignore_what_other_threads_allocate_meanwhile(
    template_repo: Template, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forward passes of other versions run while a version loads; they must not count.

    The interleaving is made deterministic: while the load deserializes, one pass frees
    its activations and another allocates.
    """
    repo = ModelRepo(str(template_repo.path))
    config = repo.read_config("mlp")
    finishing = [torch.empty(64 * MiB, dtype=torch.uint8, device=CUDA)]
    starting: list[torch.Tensor] = []
    deserialize = model_module._deserialize

    def deserialize_amid_other_passes(*args: Any) -> Any:
        result = deserialize(*args)
        finishing.clear()
        starting.append(torch.empty(16 * MiB, dtype=torch.uint8, device=CUDA))
        return result

    monkeypatch.setattr(model_module, "_deserialize", deserialize_amid_other_passes)
    loaded = load_model(repo, config, 1, CUDA)
    assert loaded.memory_bytes == parameter_bytes(template_repo.modules["mlp"])


def profile() -> torch.profiler.profile:
    """Host ops, CUDA runtime calls and device copies (events kept across profiles)."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    return torch.profiler.profile(activities=activities, acc_events=True)


def host_calls_within(profile: torch.profiler.profile, label: str) -> list[str]:
    """What ran inside the host's span of ``record_function(label)``.

    The window leaves out the profiler's own device synchronizations at start and stop.
    (The label also shows up as a GPU-side annotation; the host's span is the window.)
    """
    events: list[Any] = profile.events()  # type: ignore[no-untyped-call]
    [window] = [e for e in events if e.name == label and e.device_type.name == "CPU"]
    return [
        e.name
        for e in events
        if e is not window
        and window.time_range.start <= e.time_range.start
        and e.time_range.end <= window.time_range.end
    ]


def test_inputs_cross_through_pinned_memory_without_a_sync(template_repo: Template) -> None:
    repo = ModelRepo(str(template_repo.path))
    model = load_model(repo, repo.read_config("halfmask"), 1, CUDA)
    a = torch.tensor([[1.5, -2.0], [3.0, 4.0]], dtype=torch.float16)
    mask = torch.tensor([[True, False], [False, True]])
    torch.cuda.synchronize()

    with profile() as staging, torch.profiler.record_function("stage"):
        staged = [model_module._to_model_arg(t, CUDA) for t in (a, mask)]
    with profile() as whole, torch.profiler.record_function("run"):
        result = model.run({"a": a, "mask": mask}, 2)
    torch.cuda.synchronize()

    assert [s.device.type for s in staged] == ["cuda", "cuda"]
    assert torch.equal(staged[0].cpu(), a) and torch.equal(staged[1].cpu(), mask)
    names = [e.name for e in staging.events()]
    # Staged through page-locked memory ...
    assert any("pin_memory" in n for n in names), sorted(set(names))
    copies_in = [n for n in names if n.startswith("Memcpy HtoD")]
    assert len(copies_in) == 2 and all("Pinned" in n for n in copies_in), sorted(set(names))
    # ... and queued without waiting for the GPU (a blocking copy synchronizes the stream).
    calls = host_calls_within(staging, "stage")
    assert calls.count("cudaMemcpyAsync") == 2, calls
    assert not [n for n in calls if "Synchronize" in n], calls

    masked = result["masked"]
    assert isinstance(masked, torch.Tensor) and masked.device.type == "cpu"
    assert torch.equal(masked, torch.where(mask, a, torch.zeros_like(a)))
    names = [e.name for e in whole.events()]
    copies_in = [n for n in names if n.startswith("Memcpy HtoD")]
    assert len(copies_in) == 2 and all("Pinned" in n for n in copies_in), sorted(set(names))
    # The one wait in a forward pass is for its one output to reach the host.
    calls = host_calls_within(whole, "run")
    assert len([n for n in calls if "Synchronize" in n]) <= 1, calls
