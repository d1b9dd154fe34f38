"""The inference worker over real gRPC on loopback: every RPC, every error status, batching, rollout."""

from __future__ import annotations

import asyncio
import random
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import torch

from mesh.balance.report import LoadReport
from mesh.server.app import ServerSettings
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.workers.inference.conftest import Client, Template
from workers.inference import testing
from workers.inference.server import WorkerSettings, run_worker
from workers.inference.tensors import encode_bytes_elements
from workers.model_repo import ModelRepo

NUMPY: dict[str, type[np.generic]] = {
    "FP32": np.float32,
    "FP16": np.float16,
    "INT64": np.int64,
    "BOOL": np.bool_,
}


def infer_request(
    model: str, inputs: dict[str, torch.Tensor], version: str = "", request_id: str = ""
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, value in inputs.items():
        datatype = {
            torch.float32: "FP32",
            torch.float16: "FP16",
            torch.int64: "INT64",
            torch.bool: "BOOL",
        }[value.dtype]
        request.inputs.add(name=name, datatype=datatype, shape=list(value.shape))
        request.raw_input_contents.append(value.contiguous().view(torch.uint8).numpy().tobytes())
    return request


def output(response: pb.ModelInferResponse, name: str) -> torch.Tensor:
    for index, meta in enumerate(response.outputs):
        if meta.name == name:
            array: np.ndarray[tuple[int, ...], np.dtype[np.generic]] = np.frombuffer(
                response.raw_output_contents[index], dtype=NUMPY[meta.datatype]
            )
            return torch.from_numpy(array.copy().reshape(list(meta.shape)))
    raise AssertionError(f"no output {name!r} in {response}")


def quarter_inputs(seed: int, rows: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.round(torch.randn(rows, 4, generator=generator) * 4) / 4


async def status_of(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    raise AssertionError("the call succeeded")


async def test_health_metadata_config_and_load_report(client: Client) -> None:
    stub = client.stub
    assert (await stub.ServerLive(pb.ServerLiveRequest())).live
    ready = stub.ServerReady(pb.ServerReadyRequest())
    assert (await ready).ready
    report = LoadReport.from_metadata(await ready.trailing_metadata() or ())
    assert "mlp:1" in report.loaded_versions and report.memory_bytes > 0
    assert report.in_flight == 0 and report.queue_depth == 0
    meta = await stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "meshserve" and "model_repository" in meta.extensions
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="mlp"))).ready
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="mlp", version="1"))).ready
    assert not (await stub.ModelReady(pb.ModelReadyRequest(name="mlp", version="2"))).ready
    assert not (await stub.ModelReady(pb.ModelReadyRequest(name="ghost"))).ready
    metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name="cnn"))
    assert (metadata.name, list(metadata.versions), metadata.platform) == (
        "cnn",
        ["1"],
        "pytorch_libtorch",
    )
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("image", "FP32", [-1, 1, 8, 8])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("logits", "FP32", [-1, 3])
    ]
    config = (await stub.ModelConfig(pb.ModelConfigRequest(name="mlp"))).config
    assert config == testing.mlp_config()


async def test_infer_every_datatype_family_equals_a_direct_forward(
    client: Client, template_repo: Template
) -> None:
    modules = template_repo.modules
    stub = client.stub
    x = quarter_inputs(0, 3)
    response = await stub.ModelInfer(infer_request("mlp", {"x": x}, request_id="r1"))
    assert (response.model_name, response.model_version, response.id) == ("mlp", "1", "r1")
    assert torch.equal(output(response, "y"), modules["mlp"](x))

    image = torch.randn(2, 1, 8, 8)
    typed = pb.ModelInferRequest(model_name="cnn")
    typed.inputs.add(
        name="image", datatype="FP32", shape=[2, 1, 8, 8]
    ).contents.fp32_contents.extend(image.reshape(-1).tolist())
    response = await stub.ModelInfer(typed)
    assert torch.allclose(output(response, "logits"), modules["cnn"](image), atol=1e-6)

    ids = torch.tensor([[1, -2, 3, 2**40], [0, 0, 0, 7]])
    response = await stub.ModelInfer(infer_request("intops", {"ids": ids}))
    assert torch.equal(output(response, "total"), ids.sum(dim=1, keepdim=True))
    assert torch.equal(output(response, "doubled"), ids * 2)

    text = pb.ModelInferRequest(model_name="textops")
    text.inputs.add(name="text", datatype="BYTES", shape=[2, 1])
    text.raw_input_contents.append(encode_bytes_elements([b"mesh", b"Hi there"]))
    response = await stub.ModelInfer(text)
    assert output(response, "length").tolist() == [[4], [8]]
    upper = response.raw_output_contents[[o.name for o in response.outputs].index("upper")]
    assert upper == encode_bytes_elements([b"MESH", b"HI THERE"])

    a = torch.tensor([[1.5, -2.0], [3.0, 4.0]], dtype=torch.float16)
    mask = torch.tensor([[True, False], [False, True]])
    response = await stub.ModelInfer(infer_request("halfmask", {"a": a, "mask": mask}))
    assert torch.equal(output(response, "masked"), torch.where(mask, a, torch.zeros_like(a)))

    only = infer_request("intops", {"ids": ids})
    only.outputs.add(name="doubled")
    response = await stub.ModelInfer(only)
    assert [o.name for o in response.outputs] == ["doubled"]


async def test_every_error_status(client: Client) -> None:
    stub = client.stub
    x = quarter_inputs(1, 2)
    cases: list[tuple[pb.ModelInferRequest, grpc.StatusCode, str]] = []
    cases.append(
        (infer_request("ghost", {"x": x}), grpc.StatusCode.NOT_FOUND, "unknown model 'ghost'")
    )
    cases.append(
        (infer_request("mlp", {"x": x}, version="9"), grpc.StatusCode.NOT_FOUND, "no version 9")
    )
    wrong_type = infer_request("mlp", {"x": x.to(torch.float16)})
    cases.append((wrong_type, grpc.StatusCode.INVALID_ARGUMENT, "input 'x': datatype FP16"))
    cases.append(
        (
            infer_request("mlp", {"x": torch.zeros(2, 5)}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input 'x': shape [2, 5]",
        )
    )
    too_big = infer_request("mlp", {"x": torch.zeros(17, 4)})
    cases.append(
        (too_big, grpc.StatusCode.INVALID_ARGUMENT, "batch size 17 exceeds max_batch_size 16")
    )
    short = infer_request("mlp", {"x": x})
    short.raw_input_contents[0] = short.raw_input_contents[0][:-1]
    cases.append((short, grpc.StatusCode.INVALID_ARGUMENT, "input 'x': raw contents are 31 bytes"))
    mixed = infer_request("mlp", {"x": x})
    mixed.inputs[0].contents.fp32_contents.extend([0.0] * 8)
    cases.append((mixed, grpc.StatusCode.INVALID_ARGUMENT, "input 'x': has typed contents"))
    missing = pb.ModelInferRequest(model_name="mlp")
    cases.append((missing, grpc.StatusCode.INVALID_ARGUMENT, "missing input 'x'"))
    unknown_out = infer_request("mlp", {"x": x})
    unknown_out.outputs.add(name="nope")
    cases.append((unknown_out, grpc.StatusCode.INVALID_ARGUMENT, "unknown output 'nope'"))
    # Request parameters typed as Triton types them, with Triton's words.
    for key, kind, value, expected in (
        ("priority", "string_param", "high", "expected int64_param or uint64_param."),
        ("priority", "int64_param", -1, "invalid value for 'priority', expected value >= 0."),
        ("timeout", "uint64_param", 5, "'timeout' parameter, expected int64_param."),
        ("sequence_start", "int64_param", 1, "'sequence_start' parameter, expected bool_param."),
        ("sequence_id", "bool_param", True, "expected int64_param or string_param."),
        ("custom", "double_param", 0.5, "expected int64_param, bool_param, or string_param."),
        ("triton_x", "bool_param", True, "keys starting with 'triton_' are reserved"),
    ):
        typed = infer_request("mlp", {"x": x})
        setattr(typed.parameters[key], kind, value)
        cases.append((typed, grpc.StatusCode.INVALID_ARGUMENT, expected))
    classified = infer_request("mlp", {"x": x})
    classified.outputs.add(name="y").parameters["classification"].string_param = "3"
    cases.append(
        (classified, grpc.StatusCode.INVALID_ARGUMENT, "'classification' parameter, expected int64")
    )
    fragile = infer_request("fragile", {"x": -torch.ones(1, 2)})
    cases.append(
        (
            fragile,
            grpc.StatusCode.INTERNAL,
            "model 'fragile' version 1 failed in forward: TorchScript error",
        )
    )
    for request, code, message in cases:
        got_code, details = await status_of(stub.ModelInfer(request))
        assert (got_code, message in details) == (code, True), details
        assert "/secret/path" not in details
    # The worker keeps serving, the failing model included.
    ok = await stub.ModelInfer(infer_request("fragile", {"x": torch.ones(1, 2)}))
    assert torch.equal(output(ok, "y"), torch.full((1, 2), 2.0))
    stats = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="fragile", version="1"))
    [fragile_stats] = stats.model_stats
    assert (
        fragile_stats.inference_stats.fail.count,
        fragile_stats.inference_stats.success.count,
    ) == (1, 1)
    code, _ = await status_of(stub.ModelStatistics(pb.ModelStatisticsRequest(name="ghost")))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = await status_of(stub.ModelConfig(pb.ModelConfigRequest(name="mlp", version="x")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_message_over_the_limit_is_resource_exhausted(model_repo: Path) -> None:
    settings = WorkerSettings(str(model_repo), device="cpu", poll_interval_s=0)
    async with run_worker(settings, ServerSettings(max_message_bytes=64 * 1024)) as running:
        async with grpc.aio.insecure_channel(running.serving.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = infer_request("mlp", {"x": torch.zeros(16, 4)})
            request.raw_input_contents[0] += bytes(100 * 1024)
            code, _ = await status_of(stub.ModelInfer(request))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (await stub.ServerLive(pb.ServerLiveRequest())).live


async def test_concurrent_requests_batch_visibly_with_unbatched_results(
    model_repo: Path, template_repo: Template
) -> None:
    # A long queue delay makes the batch form however slowly a loaded machine
    # delivers the requests; the first batch then holds several of them.
    config = testing.mlp_config(queue_delay_us=200_000)
    ModelRepo(str(model_repo)).write_config("mlp", config)
    module = template_repo.modules["mlp"]
    xs = [quarter_inputs(seed, 1 + seed % 3) for seed in range(24)]
    settings = WorkerSettings(str(model_repo), device="cpu", poll_interval_s=0)
    async with run_worker(settings) as running:
        async with grpc.aio.insecure_channel(running.serving.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            responses = await asyncio.gather(
                *(stub.ModelInfer(infer_request("mlp", {"x": x})) for x in xs)
            )
            stats = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp"))
    for x, response in zip(xs, responses, strict=True):
        assert torch.equal(output(response, "y"), module(x))  # bit for bit
    [mlp] = stats.model_stats
    assert mlp.inference_count == sum(x.shape[0] for x in xs)
    assert mlp.inference_stats.success.count == len(xs)
    assert 1 <= mlp.execution_count < len(xs)
    assert sum(b.compute_infer.count for b in mlp.batch_stats) == mlp.execution_count
    assert max(b.batch_size for b in mlp.batch_stats) > 3
    assert mlp.memory_usage[0].byte_size == sum(
        p.numel() * p.element_size() for p in module.parameters()
    )


async def test_stream_infer_answers_each_request_and_survives_a_bad_one(
    client: Client, template_repo: Template
) -> None:
    module = template_repo.modules["mlp"]
    xs = {f"r{i}": quarter_inputs(100 + i, 2) for i in range(4)}

    async def requests() -> AsyncIterator[pb.ModelInferRequest]:
        for rid, x in xs.items():
            yield infer_request("mlp", {"x": x}, request_id=rid)
        yield infer_request("mlp", {"x": torch.zeros(1, 7)}, request_id="bad")

    answers = [a async for a in client.stub.ModelStreamInfer(requests())]
    assert len(answers) == len(xs) + 1
    by_id = {a.infer_response.id: a for a in answers}
    assert "input 'x': shape [1, 7]" in by_id["bad"].error_message
    for rid, x in xs.items():
        assert by_id[rid].error_message == ""
        assert torch.equal(output(by_id[rid].infer_response, "y"), module(x))


async def test_repository_index_unload_and_load(client: Client) -> None:
    stub = client.stub
    index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
    rows = {(m.name, m.version): m.state for m in index.models}
    assert rows[("mlp", "1")] == "READY" and len(rows) == 6
    await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="mlp"))
    assert not (await stub.ModelReady(pb.ModelReadyRequest(name="mlp"))).ready
    code, details = await status_of(stub.ModelInfer(infer_request("mlp", {"x": torch.zeros(1, 4)})))
    assert (code, details) == (grpc.StatusCode.UNAVAILABLE, "model 'mlp' is unloaded")
    ready_only = await stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert "mlp" not in {m.name for m in ready_only.models}
    await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mlp"))
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="mlp"))).ready
    await stub.ModelInfer(infer_request("mlp", {"x": torch.zeros(1, 4)}))
    code, _ = await status_of(
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="ghost"))
    )
    assert code == grpc.StatusCode.NOT_FOUND
    override = pb.RepositoryModelLoadRequest(model_name="mlp")
    override.parameters["config"].string_param = "{}"
    code, details = await status_of(stub.RepositoryModelLoad(override))
    assert (code, details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "model 'mlp': config must declare inputs and outputs",
    )


async def test_header_and_explicit_versions(model_repo: Path, template_repo: Template) -> None:
    config = testing.mlp_config(latest=2)
    v2 = testing.seeded(testing.MLP(), 7, exact=True)
    assert testing.publish(str(model_repo), config, v2) == 2
    v1 = template_repo.modules["mlp"]
    x = quarter_inputs(5, 2)
    settings = WorkerSettings(str(model_repo), device="cpu", poll_interval_s=0)
    async with run_worker(settings) as running:
        async with grpc.aio.insecure_channel(running.serving.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            default = await stub.ModelInfer(infer_request("mlp", {"x": x}))
            assert default.model_version == "2" and torch.equal(output(default, "y"), v2(x))
            pinned = await stub.ModelInfer(
                infer_request("mlp", {"x": x}), metadata=(("x-model-version", "1"),)
            )
            assert pinned.model_version == "1" and torch.equal(output(pinned, "y"), v1(x))
            explicit = await stub.ModelInfer(
                infer_request("mlp", {"x": x}, version="2"), metadata=(("x-model-version", "1"),)
            )
            assert explicit.model_version == "2"
            code, _ = await status_of(
                stub.ModelInfer(
                    infer_request("mlp", {"x": x}), metadata=(("x-model-version", "3"),)
                )
            )
            assert code == grpc.StatusCode.NOT_FOUND


async def test_budget_evicts_the_lru_version_and_reloads_it_on_demand(
    template_repo: Template, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    for name in ("mlp", "cnn"):
        shutil.copytree(template_repo.path / name, repo / name)
    sizes = {
        name: sum(p.numel() * p.element_size() for p in template_repo.modules[name].parameters())
        for name in ("mlp", "cnn")
    }
    budget = max(sizes.values()) + min(sizes.values()) - 1  # room for one, not both
    settings = WorkerSettings(
        str(repo), device="cpu", poll_interval_s=0, memory_budget_bytes=budget
    )
    async with run_worker(settings) as running:
        async with grpc.aio.insecure_channel(running.serving.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def infer_and_report(model: str) -> LoadReport:
                inputs = (
                    {"x": torch.zeros(1, 4)}
                    if model == "mlp"
                    else {"image": torch.zeros(1, 1, 8, 8)}
                )
                call = stub.ModelInfer(infer_request(model, inputs))
                await call
                return LoadReport.from_metadata(await call.trailing_metadata() or ())

            assert (await infer_and_report("mlp")).loaded_versions == ("mlp:1",)
            report = await infer_and_report("cnn")
            assert report.loaded_versions == ("cnn:1",) and report.memory_bytes <= budget
            assert report.memory_budget_bytes == budget
            assert (
                await stub.ModelReady(pb.ModelReadyRequest(name="mlp"))
            ).ready  # reloads on demand
            index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
            assert {m.name: m.reason for m in index.models}["mlp"].startswith("evicted")
            assert (await infer_and_report("mlp")).loaded_versions == ("mlp:1",)
            assert running.repository.cache.loads == 4  # mlp, cnn at start; cnn, mlp again


async def test_a_new_version_on_disk_becomes_the_default_without_failed_requests(
    model_repo: Path,
) -> None:
    settings = WorkerSettings(str(model_repo), device="cpu", poll_interval_s=0.05)
    v2 = testing.seeded(testing.MLP(), 11, exact=True)
    x = quarter_inputs(9, 2)
    async with run_worker(settings) as running:
        async with grpc.aio.insecure_channel(running.serving.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            versions: list[str] = []
            stop = asyncio.Event()

            async def traffic() -> None:
                while not stop.is_set():
                    response = await stub.ModelInfer(infer_request("mlp", {"x": x}))
                    versions.append(response.model_version)
                    if response.model_version == "2":
                        assert torch.equal(output(response, "y"), v2(x))

            sender = asyncio.create_task(traffic())
            while not versions:  # traffic flows on version 1 first
                await asyncio.sleep(0.01)
            await asyncio.to_thread(testing.publish, str(model_repo), testing.mlp_config(), v2)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while "2" not in versions[-3:] and loop.time() < deadline and not sender.done():
                await asyncio.sleep(0.02)
            stop.set()
            await sender  # raises if any request failed
            assert versions[0] == "1" and versions[-1] == "2"
            # Once switched it stays switched, and version 1 is retired.
            assert "1" not in versions[versions.index("2") :]
            while running.repository.cache.is_loaded(("mlp", 1)) and loop.time() < deadline:
                await asyncio.sleep(0.02)
            index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
            assert [(m.version, m.state) for m in index.models if m.name == "mlp"] == [
                ("2", "READY")
            ]


async def test_garbage_on_the_wire_gets_a_clean_status_and_the_worker_lives(
    client: Client,
) -> None:
    generator = random.Random(7)
    valid = infer_request("mlp", {"x": torch.zeros(1, 4)}).SerializeToString()
    bodies = [
        bytes(generator.getrandbits(8) for _ in range(generator.randint(0, 64))) for _ in range(30)
    ]
    # Valid prefixes with corrupted tails reach the decoder, not just the parser.
    bodies += [
        valid[: generator.randint(0, len(valid))] + bytes([generator.getrandbits(8)])
        for _ in range(30)
    ]
    raw: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = client.channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer"
    )
    codes = set()
    for body in bodies:
        try:
            await raw(body, timeout=30)
        except grpc.aio.AioRpcError as exc:
            codes.add(exc.code())
            assert exc.code() in {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}, (
                body,
                exc.details(),
            )
    assert grpc.StatusCode.INVALID_ARGUMENT in codes
    code, details = await status_of(raw(b"\xff\xff\xff", timeout=30))
    assert (code, details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "request body is not a valid inference.ModelInferRequest",
    )
    assert (await client.stub.ServerLive(pb.ServerLiveRequest())).live
    await client.stub.ModelInfer(infer_request("mlp", {"x": torch.zeros(1, 4)}))


async def test_an_undecodable_stream_message_is_answered_and_the_stream_goes_on(
    client: Client,
) -> None:
    stream: grpc.aio.StreamStreamMultiCallable[bytes, pb.ModelStreamInferResponse] = (
        client.channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
    )
    good = infer_request("mlp", {"x": torch.zeros(1, 4)}, request_id="good")

    async def bodies() -> AsyncIterator[bytes]:
        yield b"\xff\xff\xff"
        yield good.SerializeToString()

    answers = [a async for a in stream(bodies(), timeout=60)]
    assert sorted(a.error_message for a in answers) == [
        "",
        "request body is not a valid inference.ModelInferRequest",
    ]
    assert [a.infer_response.id for a in answers if not a.error_message] == ["good"]


async def test_load_report_shows_in_flight_and_queued_requests(model_repo: Path) -> None:
    # A long queue delay holds a lone request in the batcher while we look.
    ModelRepo(str(model_repo)).write_config("mlp", testing.mlp_config(queue_delay_us=1_500_000))
    settings = WorkerSettings(str(model_repo), device="cpu", poll_interval_s=0)
    async with run_worker(settings) as running:
        async with grpc.aio.insecure_channel(running.serving.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            pending = asyncio.ensure_future(
                stub.ModelInfer(infer_request("mlp", {"x": torch.zeros(1, 4)}))
            )
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while True:
                call = stub.ServerReady(pb.ServerReadyRequest())
                await call
                report = LoadReport.from_metadata(await call.trailing_metadata() or ())
                if report.queue_depth or pending.done() or loop.time() > deadline:
                    break
                await asyncio.sleep(0.01)
            assert (report.in_flight, report.queue_depth) == (1, 1)
            await pending
            call = stub.ServerReady(pb.ServerReadyRequest())
            await call
            report = LoadReport.from_metadata(await call.trailing_metadata() or ())
            assert (report.in_flight, report.queue_depth) == (0, 0)
