"""``meshserve up``: the whole mesh on one machine, until Ctrl-C or SIGTERM.

Components are child processes started in order (store, data, training, inference workers
with their sidecars, then the gateway) and stopped in reverse order. Each runs in its own
process group, which ``up`` kills once the component has stopped, so nothing it spawned
outlives it; each also gets SIGTERM from the kernel if ``up`` itself dies
(``PR_SET_PDEATHSIG``). Once everything is ready, ``up`` creates the demo dataset and trains
the demo model when the state folder has none, writes ``<state>/up.json`` for the other
commands, and prints what to try.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import grpc
from rich.console import Console
from rich.table import Table

from mesh.cli.admin_credential import ensure_admin_credential
from mesh.cli.endpoints import DEFAULT_STATE_DIR, UP_FILE, UpEndpoints
from mesh.cli.errors import CliError
from mesh.cli.train import mlp_spec, print_result, submit_and_watch
from protos.inference import grpc_service_pb2 as oip
from protos.inference import grpc_service_pb2_grpc as oip_grpc
from protos.meshserve.data.v1 import data_pb2 as data_pb
from protos.meshserve.data.v1 import data_pb2_grpc
from registry.embedded import free_port

out = Console()

#: How long a component may take to print its ready line.
START_TIMEOUT_S = 90.0
#: How long a component may take to drain after SIGTERM before it is killed.
STOP_TIMEOUT_S = 20.0
#: How long the gateway may take to see every worker in the registry.
DISCOVERY_TIMEOUT_S = 60.0
#: The routing YAML shipped with the repository (a checkout), else ./config (an installed package).
_CHECKOUT_CONFIG = Path(__file__).resolve().parents[2] / "config"
REPO_CONFIG = _CHECKOUT_CONFIG if _CHECKOUT_CONFIG.is_dir() else Path("config")

DEMO_DATASET = "demo-blobs"
DEMO_MODEL = "demo"

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Component:
    """A process of the mesh: its ``meshserve`` arguments and how its ready line reads.

    ``ready`` returns the address in the line the process prints once it serves, or None for
    any other line: processes report the address they bound, which matters for port 0.
    """

    name: str
    argv: tuple[str, ...]
    ready: Callable[[str], str | None]
    #: Start order: a tier starts after the one below is ready and stops before it.
    tier: int = 0


@dataclass
class Running:
    component: Component
    process: subprocess.Popen[str]
    address: str


def _after(prefix: str) -> Callable[[str], str | None]:
    def ready(line: str) -> str | None:
        if not line.startswith(prefix):
            return None
        rest = line[len(prefix) :].split()
        return rest[0] if rest else None

    return ready


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when ``up`` dies, however it dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the process group kill on a clean exit still applies
    # Own process group (a session): Ctrl-C at the terminal reaches only `up`, which stops
    # the components in order, and `up` can kill everything a component spawned at once.
    os.setsid()


def _pump(process: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    """Hands the child's stdout lines to ``lines`` (None at end of file)."""
    assert process.stdout is not None
    for line in process.stdout:
        lines.put(line)
    lines.put(None)


@dataclass
class Spawned:
    """A component whose process runs but has not printed its ready line yet."""

    component: Component
    process: subprocess.Popen[str]
    lines: queue.Queue[str | None]
    log: Path


def spawn(component: Component, verbose: int, log: Path) -> Spawned:
    """Starts one component's process; call from the main thread.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child ends, not the process:
    a child spawned from a short-lived helper thread would be told to stop at once.
    """
    argv = [sys.executable, "-m", "mesh.cli.main", *(["-" + "v" * verbose] if verbose else [])]
    process = subprocess.Popen(
        [*argv, *component.argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_die_with_parent,
        env=os.environ.copy(),
    )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(process, lines), daemon=True).start()
    return Spawned(component, process, lines, log)


def await_ready(spawned: Spawned, verbose: int) -> Running:
    """Waits for the ready line; the output goes to the component's log file."""
    component, process, lines = spawned.component, spawned.process, spawned.lines
    sink = spawned.log.open("a", buffering=1)
    deadline = time.monotonic() + START_TIMEOUT_S
    said = ""  # its last "error: ..." line, which names the problem
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            stop(Running(component, process, ""))
            raise CliError(
                f"{component.name} did not start within {START_TIMEOUT_S:.0f} s (see {spawned.log})"
            ) from None
        if line is None:
            code = process.wait()
            _kill_group(process)
            reason = f": {said}" if said else ""
            raise CliError(
                f"{component.name} exited with status {code} before it was ready{reason} "
                f"(log: {spawned.log})"
            )
        if line.startswith("error:"):
            said = line.removeprefix("error:").strip()
        elif said and line.startswith(" ") and line.strip():
            said += " " + line.strip()  # rich wraps long messages
        sink.write(line)
        if verbose:
            sys.stdout.write(line)
        address = component.ready(line.strip())
        if address is not None:
            threading.Thread(target=_forward, args=(lines, sink, verbose), daemon=True).start()
            return Running(component, process, address)


def _forward(lines: queue.Queue[str | None], sink: object, verbose: int) -> None:
    while (line := lines.get()) is not None:
        sink.write(line)  # type: ignore[attr-defined]
        if verbose:
            sys.stdout.write(line)
            sys.stdout.flush()


def _kill_group(process: subprocess.Popen[str]) -> None:
    """SIGKILL whatever is left in the component's process group (its own children)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def stop(running: Running) -> int:
    """SIGTERM (drain), then SIGKILL if it takes too long; then the group; returns the status."""
    return stop_together([running])[0]


def stop_together(group: Sequence[Running]) -> list[int]:
    """Stops independent components at once (they drain in parallel); their exit statuses."""
    for running in group:
        if running.process.poll() is None:
            running.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    codes = []
    for running in group:
        process = running.process
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        _kill_group(process)
        codes.append(process.returncode)
    return codes


def _run_component(args: argparse.Namespace, kind: str, es: str, *extra: str) -> tuple[str, ...]:
    """``meshserve run KIND`` arguments: the worker plus its sidecar, on free ports."""
    state = Path(args.state_dir).resolve()
    return (
        "run",
        kind,
        "--host",
        args.host,
        "--port",
        "0",
        "--config",
        str(Path(args.config).resolve()),
        "--certs",
        str(state / "certs"),
        "--es",
        es,
        *extra,
    )


def _ensure_certs(state: Path) -> None:
    if (state / "certs" / "ca.pem").exists():
        return
    from mesh.cli.main import main as cli

    code = cli(["certs", "init", "--dir", str(state / "certs")])
    if code != 0:
        raise CliError(f"could not create the mesh CA in {state / 'certs'}")


def _wait(what: str, check: Callable[[], bool], stopping: threading.Event, timeout: float) -> None:
    """Polls ``check`` until it holds; one line of status while waiting."""
    deadline = time.monotonic() + timeout
    with out.status(f"waiting for {what}"):
        while not check():
            if stopping.is_set():
                raise KeyboardInterrupt
            if time.monotonic() > deadline:
                raise CliError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.2)


def _answers(call: Callable[[], object]) -> bool:
    try:
        call()
    except grpc.RpcError:
        return False
    return True


def _demo(gateway: str, state: Path, args: argparse.Namespace, stopping: threading.Event) -> None:
    """Creates the demo dataset and trains the demo model unless the state already has them."""
    with grpc.insecure_channel(gateway) as channel:
        data = data_pb2_grpc.DataServiceStub(channel)
        oip_stub = oip_grpc.GRPCInferenceServiceStub(channel)

        def data_routed() -> bool:
            return _answers(lambda: data.ListDatasets(data_pb.ListDatasetsRequest(), timeout=2))

        _wait("the gateway to route to the data worker", data_routed, stopping, DISCOVERY_TIMEOUT_S)
        listed = data.ListDatasets(data_pb.ListDatasetsRequest(name=DEMO_DATASET), timeout=10)
        if not listed.datasets:
            request = data_pb.CreateBuiltinDatasetRequest(
                name=DEMO_DATASET,
                seed=7,
                split=data_pb.SplitSpec(validation_fraction=0.2, seed=7),
                blobs=data_pb.BlobsSource(num_examples=600, num_classes=3, num_features=4),
            )
            created = data.CreateBuiltinDataset(request, timeout=30)
            out.print(f"created dataset {created.name} version {created.version}")
        if not any((state / "models" / DEMO_MODEL).glob("[0-9]*/model.pt")):
            spec = mlp_spec(
                DEMO_MODEL,
                DEMO_DATASET,
                hidden=[16],
                epochs=args.demo_epochs,
                batch_size=32,
                learning_rate=0.02,
                device="" if args.device == "auto" else args.device,
            )
            print_result(submit_and_watch(channel, spec, out), out)

        def model_ready() -> bool:
            try:
                reply = oip_stub.ModelReady(oip.ModelReadyRequest(name=DEMO_MODEL), timeout=2)
            except grpc.RpcError:
                return False
            return bool(reply.ready)

        if args.inference_workers:
            _wait(f"model {DEMO_MODEL} to be ready", model_ready, stopping, DISCOVERY_TIMEOUT_S)


def _print_ready(started: Sequence[Running], gateway: str, state: Path, took: float) -> None:
    table = Table(title=f"meshserve is up ({took:.1f} s)", header_style="bold")
    table.add_column("component")
    table.add_column("address")
    table.add_column("pid", justify="right")
    for running in started:
        table.add_row(running.component.name, running.address, str(running.process.pid))
    out.print(table)
    out.print(f"gateway: [bold]{gateway}[/]   state: {state}   logs: {state / 'logs'}\n")
    out.print("[bold]Try, from another terminal:[/]")
    for command in (
        "meshserve status",
        "meshserve models list",
        "meshserve datasets list",
        f"meshserve infer {DEMO_MODEL} -d '[[0.5, -1.0, 2.0, 0.1]]'",
        f"meshserve train {DEMO_MODEL} --dataset {DEMO_DATASET} --epochs 3",
        "meshserve call inference.GRPCInferenceService/ModelMetadata "
        f"""-d '{{"name": "{DEMO_MODEL}"}}'""",
        f"grpcurl -plaintext {gateway} list",
        "meshserve apply -f config/examples/canary-90-10.yaml",
        f"meshserve route explain --model {DEMO_MODEL}",
        f"meshserve bench {DEMO_MODEL} -c 1 8",
        "meshserve trace   (with up --traces)",
    ):
        out.print(f"  {command}", highlight=False, soft_wrap=True)
    out.print("\nCtrl-C stops everything.", highlight=False)


def plan_workers(args: argparse.Namespace, es: str) -> list[Component]:
    """The workers with their sidecars, in start order (data first: training needs it)."""
    state = Path(args.state_dir).resolve()
    models = str(state / "models")
    sidecar_ready = _after("sidecar listening on ")
    components: list[Component] = []
    for i in range(args.data_workers):
        worker_args = f"--root {shlex.quote(str(state / 'data'))}"
        components.append(
            Component(
                f"data worker {i + 1}",
                _run_component(args, "data", es, "--worker-args", worker_args),
                sidecar_ready,
                tier=1,
            )
        )
    for i in range(args.training_workers):
        # The worker reaches the data service through its own sidecar's outbound port.
        outbound = free_port(args.host)
        worker_args = shlex.join(
            [
                "--artifacts",
                str(state / "artifacts" / f"training-{i + 1}"),
                "--model-repo",
                models,
                "--data",
                f"127.0.0.1:{outbound}",
                "--device",
                "cpu" if args.device == "auto" else args.device,
            ]
        )
        components.append(
            Component(
                f"training worker {i + 1}",
                _run_component(
                    args,
                    "training",
                    es,
                    "--outbound-port",
                    str(outbound),
                    "--worker-args",
                    worker_args,
                ),
                sidecar_ready,
                tier=1,
            )
        )
    for i in range(args.inference_workers):
        worker_args = shlex.join(
            [
                "--model-repo",
                models,
                "--device",
                args.device,
                "--poll-interval",
                "1",
                "--threads",
                "1",
            ]
        )
        components.append(
            Component(
                f"inference worker {i + 1}",
                _run_component(args, "inference", es, "--worker-args", worker_args),
                sidecar_ready,
                tier=1,
            )
        )
    return components


def run(args: argparse.Namespace) -> int:
    began = time.monotonic()
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    state = Path(args.state_dir).resolve()
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if not Path(args.config).is_dir():
        raise CliError(f"routing config folder {args.config} does not exist")
    running_up = UpEndpoints.read(state)
    if running_up is not None:
        raise CliError(f"meshserve up already runs on {state} (pid {running_up.pid})")
    started: list[Running] = []
    status = 0

    def launch(component: Component) -> Running:
        if stopping.is_set():
            raise KeyboardInterrupt
        slug = component.name.replace(" ", "-")
        spawned = spawn(component, args.verbose, logs / f"{slug}.log")
        with out.status(f"starting {component.name}"):
            running = await_ready(spawned, args.verbose)
        started.append(running)
        out.print(f"[green]✓[/] {component.name} [dim]{running.address}[/]", highlight=False)
        return running

    def launch_all(components: Sequence[Component]) -> None:
        """Starts the workers side by side (each mostly waits on imports), in plan order."""
        results: list[Running | BaseException | None] = [None] * len(components)

        spawned = [
            spawn(c, args.verbose, logs / f"{c.name.replace(' ', '-')}.log") for c in components
        ]

        def one(i: int) -> None:
            try:
                results[i] = await_ready(spawned[i], args.verbose)
            except BaseException as exc:
                results[i] = exc

        threads = [
            threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(spawned))
        ]
        with out.status(f"starting {len(components)} workers with their sidecars"):
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        failure: BaseException | None = None
        for component, each, result in zip(components, spawned, results, strict=True):
            if not isinstance(result, Running):
                # Still counted as started, so the stop below reaps it.
                started.append(Running(component, each.process, ""))
            if isinstance(result, Running):
                started.append(result)
                out.print(f"[green]✓[/] {component.name} [dim]{result.address}[/]", highlight=False)
            elif failure is None:
                failure = result
        if failure is not None:
            raise failure
        if stopping.is_set():
            raise KeyboardInterrupt

    if args.traces:
        # Every component inherits it: one JSON-lines span file for `meshserve trace`.
        os.environ["MESHSERVE_TRACES"] = f"file:{state / 'traces.jsonl'}"
    try:
        _ensure_certs(state)
        es = args.es
        if not es:
            store = Component(
                "store",
                (
                    "registry",
                    "serve-store",
                    "--data-dir",
                    str(state / "store"),
                    "--host",
                    args.host,
                ),
                _after("elasticsearch "),
            )
            es = launch(store).address
        launch_all(plan_workers(args, es))
        gateway = launch(
            Component(
                "gateway",
                (
                    "gateway",
                    "--host",
                    args.host,
                    "--port",
                    str(args.port),
                    "--config",
                    str(Path(args.config).resolve()),
                    "--certs",
                    str(state / "certs"),
                    "--es",
                    es,
                    "--auth-config",
                    str(ensure_admin_credential(state)),
                ),
                _after("gateway listening on "),
                tier=2,
            )
        ).address
        # The demo needs a data and a training worker; its readiness wait, an inference one.
        if not args.no_demo and args.data_workers and args.training_workers:
            _demo(gateway, state, args, stopping)
        UpEndpoints(
            gateway=gateway,
            es_url=es,
            pid=os.getpid(),
            components={r.component.name: r.address for r in started},
        ).write(state)
        _print_ready(started, gateway, state, time.monotonic() - began)
        sys.stdout.flush()
        while not stopping.wait(0.5):
            dead = [r for r in started if r.process.poll() is not None]
            if dead:
                out.print(
                    f"[bold red]{dead[0].component.name} exited with status "
                    f"{dead[0].process.returncode}; stopping[/] (see {logs})"
                )
                status = 1
                break
    except KeyboardInterrupt:
        pass
    finally:
        # Signals during the orderly stop would only interrupt it.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        (state / UP_FILE).unlink(missing_ok=True)
        with out.status("stopping"):
            for tier in sorted({r.component.tier for r in started}, reverse=True):
                group = [r for r in started if r.component.tier == tier]
                for running, code in zip(group, stop_together(group), strict=True):
                    if code not in (0, -signal.SIGTERM):
                        out.print(f"{running.component.name} stopped with status {code}")
                        status = status or 1
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    out.print("meshserve stopped", highlight=False)
    return status


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "up",
        help="run the whole mesh locally until Ctrl-C",
        description="Runs the local store, the mesh CA, data, training and inference workers "
        "with their sidecars, and a gateway; trains a demo model the first time; Ctrl-C stops "
        "everything.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address the components bind")
    parser.add_argument("--port", type=int, default=8080, help="gateway port (0: any free port)")
    parser.add_argument(
        "--state-dir",
        default=str(DEFAULT_STATE_DIR),
        help="datasets, models, jobs, certificates and store data (default %(default)s)",
    )
    parser.add_argument(
        "--config", default=str(REPO_CONFIG), help="routing YAML folder (default: config/)"
    )
    parser.add_argument(
        "--es", default=None, help="an Elasticsearch URL instead of the embedded store"
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="worker device"
    )
    parser.add_argument("--inference-workers", type=_count, default=2, metavar="N")
    parser.add_argument("--training-workers", type=_count, default=1, metavar="N")
    parser.add_argument("--data-workers", type=_count, default=1, metavar="N")
    parser.add_argument("--demo-epochs", type=int, default=2, help="epochs of the first demo model")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo dataset and model")
    parser.add_argument(
        "--traces",
        action="store_true",
        help="record every request's spans in <state>/traces.jsonl (see `meshserve trace`)",
    )
    parser.set_defaults(handler=run)
