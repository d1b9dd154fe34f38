"""GPU serving benchmark: a ResNet-50-sized CNN in FP32 and FP16 through the inference worker,
against a plain PyTorch loop running the same batch sizes on the same GPU (the limit).

Run (GPU): ``python -m bench.gpu_serving [--seconds 10] [--procs 8 --inflight 32]``
Debug on a CPU: ``python -m bench.gpu_serving --device cpu --tiny`` (< 60 s).

The CNN is defined here (bottleneck blocks [3, 4, 6, 3], widths 64..2048, 1000 classes,
random weights, nothing downloaded), exported to TorchScript into a temporary model
repository as two models (``resnet50_fp32`` and ``resnet50_fp16``, inputs 3x224x224 of
TYPE_FP32 / TYPE_FP16), each with ``instance_group { count: 2 kind: KIND_GPU }``,
dynamic batching up to ``--max-batch`` and ``CUDA_GRAPHS: "true"``. A load generator of
``--procs`` client processes, each keeping ``--inflight`` requests in flight (8x32 = 256)
with pre-encoded raw contents, drives:

* ``worker``: one ``meshserve worker inference`` reached directly;
* ``mesh``: the same worker behind a ``meshserve sidecar`` (mutual TLS, registered in the
  embedded store) and a ``meshserve gateway``, the path every call through ``up`` takes.

The ``plain loop`` row runs the same TorchScript file on the same GPU in this process:
forward passes over device-resident inputs, cycling through the batch sizes the worker ran
(its ModelStatistics histogram), no serving at all. GPU utilisation is the mean of
``nvidia-smi --query-gpu=utilization.gpu -lms 200`` samples taken during each run.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import torch
from torch import nn

from bench.children import process
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.inference import model_config_pb2 as mc
from workers.inference import testing
from workers.inference.gpu.plan import CUDA_GRAPHS_PARAMETER
from workers.model_repo import ModelRepo

INFER = "/inference.GRPCInferenceService/ModelInfer"
#: Room for a batch of 3x224x224 FP32 images either way (tritonclient's 2 GiB is overkill).
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
]


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        width = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.down = (
            nn.Sequential(
                nn.Conv2d(inplanes, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width)
            )
            if stride != 1 or inplanes != width
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        result: torch.Tensor = self.relu(out + self.down(x))
        return result


class ResNet(nn.Module):
    """ResNet-50's shape: stem, bottleneck stages [3, 4, 6, 3], global pool, 1000 classes."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), base: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(base),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        blocks: list[nn.Module] = []
        inplanes = base
        for stage, count in enumerate(layers):
            planes = base * 2**stage
            for i in range(count):
                blocks.append(Bottleneck(inplanes, planes, 2 if i == 0 and stage > 0 else 1))
                inplanes = planes * Bottleneck.expansion
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, 1000)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.pool(self.blocks(self.stem(image))).flatten(1))
        return out


@dataclass(frozen=True)
class Setup:
    device: str
    tiny: bool
    max_batch: int
    instances: int
    graphs: bool
    queue_delay_us: int

    @property
    def image(self) -> tuple[int, int, int]:
        return (3, 32, 32) if self.tiny else (3, 224, 224)


DTYPES = {
    "fp32": (torch.float32, testing.FP32, "FP32"),
    "fp16": (torch.float16, testing.FP16, "FP16"),
}


def build_repository(path: Path, setup: Setup) -> dict[str, Path]:
    """Publishes one model per dtype; returns each model's TorchScript file."""
    files: dict[str, Path] = {}
    for tag, (dtype, config_type, _) in DTYPES.items():
        torch.manual_seed(0)
        module = (ResNet((1, 1, 1, 1), 8) if setup.tiny else ResNet()).eval().to(dtype)
        name = f"resnet50_{tag}"
        config = testing.model_config(
            name,
            [("image", config_type, setup.image)],
            [("logits", config_type, [1000])],
            max_batch_size=setup.max_batch,
            queue_delay_us=setup.queue_delay_us,
        )
        config.instance_group.add(count=setup.instances, kind=mc.ModelInstanceGroup.KIND_GPU)
        config.parameters[CUDA_GRAPHS_PARAMETER].string_value = "true" if setup.graphs else "false"
        version = testing.publish(str(path), config, module)
        files[name] = Path(ModelRepo(str(path)).version_path(name, version)) / "model.pt"
    return files


def request_bytes(name: str, setup: Setup) -> bytes:
    dtype, _, datatype = DTYPES[name.rsplit("_", 1)[1]]
    request = pb.ModelInferRequest(model_name=name)
    request.inputs.add(name="image", datatype=datatype, shape=[1, *setup.image])
    image = torch.randn(1, *setup.image, generator=torch.Generator().manual_seed(1)).to(dtype)
    request.raw_input_contents.append(image.numpy().tobytes())
    request.outputs.add(name="logits")
    return request.SerializeToString()


# -- load generator (runs in client processes) -----------------------------------------------


def client_process(
    address: str, body: bytes, inflight: int, start_at: float, seconds: float
) -> tuple[int, list[float]]:
    """Keeps ``inflight`` calls going until ``start_at + seconds`` (wall clock); returns the
    calls completed inside [start_at, end] and their latencies in ms."""
    return asyncio.run(_client(address, body, inflight, start_at, seconds))


async def _client(
    address: str, body: bytes, inflight: int, start_at: float, seconds: float
) -> tuple[int, list[float]]:
    end = start_at + seconds
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        # Pre-encoded request, undecoded reply: the client spends no CPU on protobuf.
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(INFER)

        async def caller() -> None:
            while (now := time.time()) < end:
                began = time.perf_counter()
                await call(body, timeout=60)
                if now >= start_at:
                    latencies.append((time.perf_counter() - began) * 1000)

        await asyncio.gather(*(caller() for _ in range(inflight)))
    return len(latencies), latencies


# -- measurement ------------------------------------------------------------------------------


class Utilisation:
    """nvidia-smi's GPU utilisation, sampled every 200 ms while the context is open."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Utilisation:
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "200",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        out, _ = self._proc.communicate(timeout=10)
        self.samples = [int(v) for v in out.split() if v.strip().isdigit()]

    @property
    def mean(self) -> str:
        return f"{statistics.mean(self.samples):.0f}" if self.samples else "n/a"


@dataclass(frozen=True)
class Row:
    model: str
    path: str
    throughput: float
    p50_ms: float | None
    p99_ms: float | None
    mean_batch: float
    gpu_util: str


async def wait_model_ready(address: str, names: list[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for name in names:
            while True:
                try:
                    reply = await stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=5)
                    if reply.ready:
                        break
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not ready at {address}")
                await asyncio.sleep(0.2)


async def batch_histogram(address: str, name: str) -> Counter[int]:
    """Executions per batch size so far, from the worker's ModelStatistics."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        reply = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=name))
    return Counter({b.batch_size: b.compute_infer.count for b in reply.model_stats[0].batch_stats})


def drive(
    address: str, worker: str, name: str, path: str, setup: Setup, args: argparse.Namespace
) -> tuple[Row, Counter[int]]:
    body = request_bytes(name, setup)
    before = asyncio.run(batch_histogram(worker, name))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.procs, mp_context=context) as pool:
        # Started (and this module imported) in every process before the clock starts:
        # each of these holds its process long enough that no process takes two.
        list(pool.map(time.sleep, [0.5] * args.procs))
        # Every client connects and warms up before the common measured window opens.
        start_at = time.time() + args.warmup
        futures = [
            pool.submit(client_process, address, body, args.inflight, start_at, args.seconds)
            for _ in range(args.procs)
        ]
        time.sleep(max(0.0, start_at - time.time()))
        with Utilisation() as util:
            time.sleep(args.seconds)
        results = [f.result() for f in futures]
    after = asyncio.run(batch_histogram(worker, name))
    ran = after - before
    latencies = sorted(x for _, lat in results for x in lat)
    count = sum(n for n, _ in results)
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    images = sum(size * n for size, n in ran.items())
    row = Row(
        name, path, count / args.seconds, q[49], q[98], images / max(ran.total(), 1), util.mean
    )
    return row, ran


def batch_schedule(ran: Counter[int], entries: int = 64) -> list[int]:
    """The worker's batch sizes in proportion to its executions, as one cycle of ``entries``.

    Sizes under half an entry's share drop out rather than each counting once, which
    would tilt a long tail of rare sizes towards larger batches than the worker ran.
    """
    total = ran.total()
    return [size for size, n in sorted(ran.items()) for _ in range(round(entries * n / total))]


def loop(
    module: Callable[[torch.Tensor], object],
    inputs: dict[int, torch.Tensor],
    schedule: list[int],
    seconds: float,
    sync: Callable[[], None],
) -> tuple[int, float]:
    """Forward passes around ``schedule`` for about ``seconds``; (images, elapsed seconds).

    The clock is read between passes, not after a whole cycle, so a long cycle of large
    batches on a slow device does not overrun; the GPU is drained before the clock stops.
    """
    images, began, index = 0, time.perf_counter(), 0
    while time.perf_counter() - began < seconds:
        size = schedule[index % len(schedule)]
        module(inputs[size])
        images += size
        index += 1
    sync()
    return images, time.perf_counter() - began


def plain_loop(
    file: Path, name: str, ran: Counter[int], setup: Setup, seconds: float, warm_s: float
) -> Row:
    """Forward passes of the same file on the same device, same batch sizes, no serving."""
    dtype = DTYPES[name.rsplit("_", 1)[1]][0]
    device = torch.device(setup.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(io.BytesIO(file.read_bytes()), map_location=device)  # type: ignore[no-untyped-call]
    module.eval()
    schedule = batch_schedule(ran) or [setup.max_batch]
    inputs = {s: torch.randn(s, *setup.image, device=device).to(dtype) for s in set(schedule)}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        # Warm every size, then the schedule itself: TorchScript's profiling executor
        # re-specializes (slowly) as shapes change and settles only after many passes;
        # the worker had its warm-up too.
        for size in sorted(inputs):
            for _ in range(3):
                module(inputs[size])
        loop(module, inputs, schedule, warm_s, sync)
        with Utilisation() as util:
            images, elapsed = loop(module, inputs, schedule, seconds, sync)
    return Row(
        name, "plain loop", images / elapsed, None, None, statistics.mean(schedule), util.mean
    )


# -- the mesh ---------------------------------------------------------------------------------


def start_mesh(stack: ExitStack, worker: str, tmp: Path) -> str:
    """Store, sidecar (mutual TLS) in front of ``worker``, gateway in front of the sidecar."""
    from bench.sidecar import _gateway, _sidecar
    from mesh.security.ca import CertificateAuthority
    from registry.embedded import EmbeddedStore

    store = stack.enter_context(EmbeddedStore(tmp / "store", advertise=False))
    certs = tmp / "certs"
    CertificateAuthority.create("cluster.local").save(certs)
    sidecar = _sidecar(stack, worker, store.url, certs)
    return _gateway(stack, sidecar, certs)


def worker_process(
    repo: Path, device: str, switch_interval: float | None = None
) -> AbstractContextManager[str]:
    args = ["worker", "inference", "--port", "0", "--model-repo", str(repo)]
    args += ["--device", device, "--poll-interval", "0"]
    if switch_interval is not None:
        return process("bench.switch_worker", str(switch_interval), *args, stop_timeout=30)
    return process("cli.main", *args, stop_timeout=30)


def print_table(rows: list[Row], setup: Setup, args: argparse.Namespace) -> None:
    gpu = torch.cuda.get_device_name() if setup.device == "cuda" else "CPU"
    print(
        f"\n## GPU serving: ResNet-50-sized CNN {'(tiny) ' if setup.tiny else ''}on {gpu}, "
        f"{args.procs}x{args.inflight} in flight, {args.seconds:g} s per run, "
        f"max_batch {setup.max_batch}, {setup.instances} instances, "
        f"CUDA graphs {'on' if setup.graphs else 'off'}, worker switch interval "
        f"{args.switch_interval or sys.getswitchinterval()} s; torch {torch.__version__}\n"
    )
    print("| model | path | infer/s | ÷ plain loop | p50 ms | p99 ms | mean batch | GPU util % |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    limits = {r.model: r.throughput for r in rows if r.path == "plain loop"}
    for r in rows:
        ratio = r.throughput / limits[r.model] if limits.get(r.model) else float("nan")
        p50 = f"{r.p50_ms:.1f}" if r.p50_ms is not None else "-"
        p99 = f"{r.p99_ms:.1f}" if r.p99_ms is not None else "-"
        print(
            f"| {r.model} | {r.path} | {r.throughput:.0f} | {ratio:.2f} | {p50} | {p99} | "
            f"{r.mean_batch:.1f} | {r.gpu_util} |"
        )
    print("\ntarget: worker ≥ 0.80 x plain loop at 256 in flight", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny CNN on 32x32 images, short runs"
    )
    parser.add_argument("--seconds", type=float, default=None, help="measured time per run")
    parser.add_argument("--warmup", type=float, default=None, help="unmeasured seconds first")
    parser.add_argument("--procs", type=int, default=None, help="client processes")
    parser.add_argument("--inflight", type=int, default=32, help="requests in flight per process")
    parser.add_argument("--max-batch", type=int, default=None)
    parser.add_argument("--instances", type=int, default=2, help="instance_group count")
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--queue-delay-us", type=int, default=500)
    parser.add_argument("--models", default="fp16,fp32", help="comma-separated: fp16, fp32")
    parser.add_argument("--mesh", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="the worker's sys.setswitchinterval (a probe; default: Python's 5 ms)",
    )
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (1.0 if args.tiny else 10.0)
    args.warmup = args.warmup or (1.0 if args.tiny else 3.0)
    args.procs = args.procs or (2 if args.tiny else 8)
    if args.tiny:
        args.inflight = min(args.inflight, 8)
    setup = Setup(
        args.device,
        args.tiny,
        args.max_batch or (16 if args.tiny else 128),
        args.instances,
        args.graphs,
        args.queue_delay_us,
    )
    if setup.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: run with --device cpu --tiny", file=sys.stderr)
        return 2
    names = [f"resnet50_{tag.strip()}" for tag in args.models.split(",")]
    rows: list[Row] = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        files = build_repository(tmp / "repo", setup)
        began = time.monotonic()
        worker = stack.enter_context(
            worker_process(tmp / "repo", setup.device, args.switch_interval)
        )
        asyncio.run(wait_model_ready(worker, names))
        print(f"worker at {worker}: models loaded in {time.monotonic() - began:.1f} s", flush=True)
        gateway = None
        if args.mesh:
            gateway = start_mesh(stack, worker, tmp)
            asyncio.run(wait_model_ready(gateway, names, timeout=60))
            print(f"mesh: gateway at {gateway}", flush=True)
        for name in names:
            row, ran = drive(worker, worker, name, "worker", setup, args)
            print(row, dict(ran.most_common(6)), flush=True)
            limit = plain_loop(files[name], name, ran, setup, args.seconds, args.warmup)
            print(limit, flush=True)
            rows += [limit, row]
            if gateway is not None:
                meshed, _ = drive(
                    gateway, worker, name, "gateway → sidecar (mTLS) → worker", setup, args
                )
                print(meshed, flush=True)
                rows.append(meshed)
            if setup.device == "cuda":
                torch.cuda.empty_cache()
    print_table(rows, setup, args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
