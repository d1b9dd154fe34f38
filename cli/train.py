"""``meshserve train``: submits a training job, follows it with a live progress bar, prints the result."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.endpoints import gateway_from_args
from gateway.fleet_merge import served_everywhere
from mesh.cli_error import CliError
from protos.inference import grpc_service_pb2 as oip
from protos.inference import grpc_service_pb2_grpc as oip_grpc
from protos.meshserve.training.v1 import training_pb2 as pb
from protos.meshserve.training.v1 import training_pb2_grpc
from registry.state_dir import add_state_dir_argument

out = Console()

#: How long a watch waits for the training service to answer again: `up` restarts a dead
#: training worker after a backoff (at most 8 s) and its start (imports torch: up to a
#: minute on a loaded machine).
SERVICE_OUTAGE_S = 120.0
_FINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}
_OPTIMIZERS = {
    "sgd": pb.OPTIMIZER_KIND_SGD,
    "momentum": pb.OPTIMIZER_KIND_SGD_MOMENTUM,
    "adam": pb.OPTIMIZER_KIND_ADAM,
    "adamw": pb.OPTIMIZER_KIND_ADAMW,
}


def mlp_spec(
    model: str,
    dataset: str,
    *,
    hidden: list[int],
    epochs: int,
    batch_size: int,
    learning_rate: float,
    optimizer: str = "adam",
    seed: int = 0,
    device: str = "",
) -> pb.JobSpec:
    """A job training an MLP classifier or regressor on ``dataset`` (latest version)."""
    return pb.JobSpec(
        model_name=model,
        architecture=pb.Architecture(mlp=pb.MlpSpec(hidden_sizes=hidden, activation="relu")),
        dataset=pb.DatasetRef(name=dataset),
        optimizer=pb.Optimizer(kind=_OPTIMIZERS[optimizer], learning_rate=learning_rate),
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        standardize=True,
        log_every_steps=1,
        device=device,
    )


def submit_and_watch(
    channel: grpc.Channel,
    spec: pb.JobSpec,
    console: Console = out,
    *,
    outage_s: float = SERVICE_OUTAGE_S,
) -> pb.Job:
    """SubmitJob, then a progress bar fed by WatchJob until the job ends; returns the final job.

    A watch that breaks because the training service is unavailable (its worker died and
    is restarting: the job resumes from its checkpoint there) is waited out for up to
    ``outage_s`` seconds, then resumed from the last event seen.
    """
    stub = training_pb2_grpc.TrainingServiceStub(channel)
    job = stub.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=30)
    console.print(f"job [bold]{job.id}[/]: training {spec.model_name} on {spec.dataset.name}")
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    last = 0
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("queued", total=job.total_steps or None, detail="")
        # WatchJob may end early (a gateway retry, a restart): resume from the last event.
        while True:
            try:
                for event in stub.WatchJob(pb.WatchJobRequest(job_id=job.id, from_event=last + 1)):
                    last = event.sequence
                    kind = event.WhichOneof("kind")
                    if kind == "state_changed":
                        progress.update(
                            task,
                            description=pb.JobState.Name(event.state_changed.state)
                            .removeprefix("JOB_STATE_")
                            .lower(),
                        )
                        if event.state_changed.message:
                            # Why: a resume from a checkpoint, a failure's reason.
                            progress.console.print(event.state_changed.message, highlight=False)
                    elif kind == "step_loss":
                        s = event.step_loss
                        if progress.tasks[task].total is None:
                            progress.update(
                                task,
                                total=stub.GetJob(
                                    pb.GetJobRequest(job_id=job.id), timeout=10
                                ).total_steps
                                or None,
                            )
                        progress.update(
                            task,
                            completed=s.step,
                            detail=f"epoch {s.epoch} loss {s.loss:.4f} {s.examples_per_second:,.0f} ex/s",
                        )
                    elif kind == "epoch_metrics":
                        m = event.epoch_metrics
                        text = " ".join(f"{k}={v:.4f}" for k, v in sorted(m.metrics.items()))
                        progress.console.print(f"epoch {m.epoch}: {text}", highlight=False)
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    raise
            job = _get_job_once_back(stub, job.id, progress.console, outage_s)
            if job.state in _FINAL:
                if job.total_steps:
                    progress.update(task, total=job.total_steps, completed=job.step)
                progress.update(task, description=pb.JobState.Name(job.state)[10:].lower())
                break
    if job.state != pb.JOB_STATE_SUCCEEDED:
        raise CliError(
            f"job {job.id} {pb.JobState.Name(job.state)[10:].lower()}: {job.message or 'no reason'}"
        )
    return job


def _get_job_once_back(
    stub: training_pb2_grpc.TrainingServiceStub, job_id: str, console: Console, outage_s: float
) -> pb.Job:
    """GetJob, retried while the training service is unavailable, for up to ``outage_s``."""
    deadline = time.monotonic() + outage_s
    told = False
    while True:
        try:
            return stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() >= deadline:
                raise
            if not told:
                console.print(
                    f"training service unavailable ({exc.details()}); waiting up to "
                    f"{outage_s:.0f} s for it to come back",
                    highlight=False,
                )
                told = True
        time.sleep(1.0)


def print_result(job: pb.Job, console: Console = out) -> None:
    table = Table(title=f"{job.published.model_name} version {job.published.version}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in sorted(job.metrics.items()):
        table.add_row(name, f"{value:.4f}")
    console.print(table)
    console.print(f"published at {job.published.uri}", highlight=False)


#: How long ``train`` waits, by default, for every inference worker to serve what it published.
WAIT_SERVED_S = 60.0
#: How often it asks.
_POLL_S = 0.25


def fleet_serves(channel: grpc.Channel, model: str, version: str | None = None) -> bool | None:
    """Whether every inference worker behind the gateway serves ``model`` (``version``,
    else every version listed), from the gateway's merged RepositoryIndex; None when the
    address answers no RepositoryIndex (a training worker reached directly).

    Right after a version is published each worker notices it at its own repository
    poll: until the last one has, a call the ring sends to another is NOT_FOUND.
    """
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    try:
        index = stub.RepositoryIndex(oip.RepositoryIndexRequest(), timeout=10)
    except grpc.RpcError as exc:
        if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
            return None
        return False
    return served_everywhere(index, model, version)


def wait_served(channel: grpc.Channel, model: str, version: str, timeout: float) -> bool:
    """Polls :func:`fleet_serves` until it holds (True), the address turns out not to be a
    gateway (False: nothing to wait for), or ``timeout`` passes (CliError naming why)."""
    deadline = time.monotonic() + timeout
    while True:
        serves = fleet_serves(channel, model, version)
        if serves is None:
            return False
        if serves:
            return True
        if time.monotonic() >= deadline:
            raise CliError(
                f"{model} version {version} is published but not served by every inference "
                f"worker after {timeout:g} s (see `meshserve models served {model}`; "
                "--wait-served 0 returns at publication)"
            )
        time.sleep(_POLL_S)


def run(args: argparse.Namespace) -> int:
    hidden: list[int] = args.hidden
    if args.optimizer not in _OPTIMIZERS:
        raise CliError(f"unknown optimizer {args.optimizer!r}: one of {', '.join(_OPTIMIZERS)}")
    spec = mlp_spec(
        args.model,
        args.dataset,
        hidden=hidden,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        optimizer=args.optimizer,
        seed=args.seed,
        device=args.device,
    )
    spec.world_size = args.world_size
    with grpc.insecure_channel(gateway_from_args(args, args.address)) as channel:
        job = submit_and_watch(channel, spec)
        print_result(job)
        # Returning at publication would let the next command (`infer --version N`, a
        # canary) meet a worker whose repository poll has not seen the version yet.
        published = job.published
        if args.wait_served > 0 and wait_served(
            channel, published.model_name, str(published.version), args.wait_served
        ):
            out.print(
                f"served by every inference worker: {published.model_name} "
                f"version {published.version}",
                highlight=False,
            )
    return 0


def _ranged(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer the JobSpec field can hold (protobuf's own check
    said only "Value out of range", naming no flag)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range [{low}, {high}]")
        return value

    return parse


_INT32 = _ranged(-(1 << 31), (1 << 31) - 1)
_UINT64 = _ranged(0, (1 << 64) - 1)


def _sizes(text: str) -> list[int]:
    """--hidden: comma-separated layer widths."""
    return [_INT32(part.strip()) for part in text.split(",") if part.strip()]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train the next version of a model (live progress)",
        description="Submits an MLP training job through the gateway, shows its progress from "
        "WatchJob, then prints the published version and its metrics.",
    )
    parser.add_argument("model", help="model name; the job publishes its next version")
    parser.add_argument("--dataset", required=True, help="dataset name (latest version)")
    parser.add_argument(
        "--hidden", type=_sizes, default=[32], help="hidden layer sizes, comma separated"
    )
    parser.add_argument("--epochs", type=_INT32, default=3)
    parser.add_argument("--batch-size", type=_INT32, default=64)
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate")
    parser.add_argument("--optimizer", default="adam", help=", ".join(_OPTIMIZERS))
    parser.add_argument("--seed", type=_UINT64, default=0)
    parser.add_argument("--device", default="", help="cpu, cuda or empty (worker's default)")
    parser.add_argument(
        "--world-size",
        type=_INT32,
        default=0,
        help="DDP processes (0 or 1: one); a worker of a node group spreads its group's "
        "world size across hosts",
    )
    parser.add_argument(
        "--address", default=None, help="gateway or training worker (default: the running up)"
    )
    parser.add_argument(
        "--wait-served",
        type=float,
        default=WAIT_SERVED_S,
        metavar="SECONDS",
        help="after publication, wait until every inference worker behind the gateway serves "
        "the new version (default: %(default)g; 0: return at publication)",
    )
    add_state_dir_argument(parser)
    parser.set_defaults(handler=run)
