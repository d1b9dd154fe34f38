"""``meshserve up``: the whole mesh on one machine, supervised, until Ctrl-C or SIGTERM.

Components are child processes started in order (store, data, training, inference workers
with their sidecars, then the gateway) and stopped in reverse order (see
``supervision.processes``). Once everything is ready, ``up`` creates the demo dataset and
trains the demo model when the state folder has none, writes ``<state>/up.json`` for the
other commands, and prints what to try. Then it supervises: a component that exits is
restarted on the same arguments with backoff, within a restart-intensity limit
(``supervision.policy``), and the registry janitor sweeps dead instances' documents.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import os
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

import grpc
from rich.console import Console
from rich.table import Table

from cli.admin_credential import ensure_admin_credential, own_admin_metadata
from cli.endpoints import UpStatus
from cli.routed import wait_routed
from cli.supervision.elastic import ElasticGroup, LoadFeed
from cli.supervision.janitor import Janitor
from cli.supervision.policy import RestartPolicy
from cli.supervision.processes import Component, Running, after, await_ready, spawn
from cli.supervision.supervisor import Supervisor
from cli.supervision.units import UnitStatus
from cli.train import fleet_serves, mlp_spec, print_result, submit_and_watch
from gateway.app import DEFAULT_PORT
from mesh.cli_args import port_number
from mesh.cli_error import CliError
from mesh.config.autoscale import AutoscaleSettings
from mesh.config.fields import ConfigError
from mesh.config.hosts import normalise_host
from mesh.config.snapshot import config_from_path
from mesh.scaling.autoscaler import Autoscaler, Bounds
from protos.meshserve.data.v1 import data_pb2 as data_pb
from protos.meshserve.data.v1 import data_pb2_grpc
from registry.connect import StoreSettings
from registry.embedded import free_port
from registry.locate import STORE_SUBDIR
from registry.state_dir import (
    DEFAULT_STATE_DIR,
    FALLBACK_STATE_DIR,
    STATE_DIR_ENV,
    UP_FILE,
    UpEndpoints,
)
from registry.store_url import store_url

out = Console()

#: How long the gateway may take to see every worker in the registry.
DISCOVERY_TIMEOUT_S = 60.0
#: The routing YAML shipped with the repository (a checkout), else ./config (an installed package).
_CHECKOUT_CONFIG = Path(__file__).resolve().parents[2] / "config"
REPO_CONFIG = _CHECKOUT_CONFIG if _CHECKOUT_CONFIG.is_dir() else Path("config")

DEMO_DATASET = "demo-blobs"
DEMO_MODEL = "demo"


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


def check_port_free(host: str, port: int) -> None:
    """Raises CliError naming ``host:port`` when something already listens there.

    Checked before anything starts: otherwise the store and every worker would start (a
    minute of imports and training) before the gateway found its port taken. Bound the
    way the relay binds (SO_REUSEADDR), so a port held only by connections in TIME_WAIT
    after a previous ``up`` still counts as free, as it is for the gateway.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CliError(
                    f"{host}:{port} is already in use (another `meshserve up`, or another "
                    f"server): stop it, or choose another gateway port with --port"
                ) from None
            raise CliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def ensure_mesh_ca(state: Path) -> None:
    """The mesh CA under ``<state>/certs`` (``meshserve certs init``), unless one is there:
    ``up`` and ``hosts up`` issue every unit's certificate from it."""
    if (state / "certs" / "ca.pem").exists():
        return
    from cli.main import main as cli

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


def outbound_port(component: Component) -> int | None:
    """The port of a unit's way out (``--outbound-port``), if it has one."""
    argv = component.argv
    if "--outbound-port" not in argv[:-1]:
        return None
    return int(argv[argv.index("--outbound-port") + 1])


def _wait_ways_out(workers: Sequence[Running], stopping: threading.Event) -> None:
    """Waits until each training worker's way out reaches the data service.

    Its sidecar's outbound discovers the data workers by a registry watch of its own, not
    the gateway's: the gateway may route to both while a SubmitJob's dataset lookup still
    finds no data endpoint (UNAVAILABLE). Asked the way the worker asks, through the port.
    """
    for worker in workers:
        port = outbound_port(worker.component)
        if port is not None:
            _wait(
                f"{worker.component.name} to reach the data service",
                functools.partial(_reaches_data, f"127.0.0.1:{port}"),
                stopping,
                DISCOVERY_TIMEOUT_S,
            )


def _reaches_data(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        data = data_pb2_grpc.DataServiceStub(channel)
        return _answers(lambda: data.ListDatasets(data_pb.ListDatasetsRequest(), timeout=2))


def _demo(gateway: str, state: Path, args: argparse.Namespace, stopping: threading.Event) -> None:
    """Creates the demo dataset and trains the demo model unless the state already has them."""
    with grpc.insecure_channel(gateway) as channel:
        data = data_pb2_grpc.DataServiceStub(channel)

        # The gateway routes to every worker already (run waited for it).
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

        def model_served() -> bool:
            return bool(fleet_serves(channel, DEMO_MODEL))

        # Ready means every inference worker serves it, not just one: each notices a newly
        # trained model at its own repository poll, and the ring sends calls to all of them.
        if inference_start_count(args):
            _wait(
                f"model {DEMO_MODEL} on every inference worker",
                model_served,
                stopping,
                DISCOVERY_TIMEOUT_S,
            )


def _print_ready(units: Sequence[UnitStatus], gateway: str, state: Path, took: float) -> None:
    table = Table(title=f"meshserve is up ({took:.1f} s)", header_style="bold")
    table.add_column("component")
    table.add_column("address")
    table.add_column("pid", justify="right")
    for unit in units:
        table.add_row(unit.name, unit.address, str(unit.pid))
    out.print(table)
    out.print(f"gateway: [bold]{gateway}[/]   state: {state}   logs: {state / 'logs'}\n")
    out.print("[bold]Try, from another terminal:[/]")
    for command in try_commands(gateway, state):
        out.print(f"  {command}", highlight=False, soft_wrap=True)
    out.print("\nCtrl-C stops everything.", highlight=False)


def try_commands(gateway: str, state: Path) -> list[str]:
    """The commands ``up`` suggests once ready, as they work pasted into another terminal."""
    # The CLI finds a running up through its state folder (.meshserve unless told): with
    # another --state-dir, a pasted `meshserve status` would look for a different up.
    export = (
        []
        if state == FALLBACK_STATE_DIR.resolve()
        else [f"export {STATE_DIR_ENV}={shlex.quote(str(state))}   (this up's state folder)"]
    )
    return [
        *export,
        "meshserve status",
        "meshserve restart inference-1   (a rolling restart: drains, then starts it again)",
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
    ]


def plan_workers(args: argparse.Namespace, es: str) -> list[Component]:
    """The workers with their sidecars, in start order (data first: training needs it)."""
    state = Path(args.state_dir).resolve()
    models = str(state / "models")
    sidecar_ready = after("sidecar listening on ")
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
                # Jobs in the registry, and every published version recorded in its model
                # catalog: `meshserve models list|promote|rollback` work out of the box.
                "--es",
                es,
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
    for i in range(inference_start_count(args)):
        components.append(inference_component(args, es, i + 1))
    return components


#: Seconds a starting inference worker waits for its sidecar's preload list.
PRELOAD_WAIT_S = 30


def inference_component(args: argparse.Namespace, es: str, number: int) -> Component:
    """Inference worker ``number`` with its sidecar (the autoscaler starts more of these)."""
    state = Path(args.state_dir).resolve()
    worker_args = shlex.join(
        [
            "--model-repo",
            str(state / "models"),
            "--device",
            args.device,
            "--poll-interval",
            "1",
            "--threads",
            "1",
            # Before loading, its sidecar says which versions the ring will send it
            # (those load first); without an answer in this time it loads them all.
            "--preload-wait",
            str(PRELOAD_WAIT_S),
        ]
    )
    return Component(
        f"inference worker {number}",
        _run_component(args, "inference", es, "--worker-args", worker_args),
        after("sidecar listening on "),
        tier=1,
    )


def inference_start_count(args: argparse.Namespace) -> int:
    """--inference-workers, else the autoscale minimum, else 2; within the autoscale bounds."""
    bounds: Bounds | None = args.autoscale
    if bounds is None:
        return 2 if args.inference_workers is None else int(args.inference_workers)
    if args.inference_workers is None:
        return bounds.min
    return bounds.clamp(int(args.inference_workers))


def autoscale_settings(config: Path, service: str) -> AutoscaleSettings:
    """The service's ``meshserve.io/autoscale-*`` annotations (its DestinationRule's), else
    the defaults."""
    try:
        snapshot = config_from_path(config)
    except ConfigError as exc:
        raise CliError(f"routing config: {exc.message}") from None
    for rule in snapshot.destination_rules.values():
        with contextlib.suppress(ValueError):
            if normalise_host(rule.host) == service:
                return rule.extensions.autoscale
    return AutoscaleSettings()


def store_component(args: argparse.Namespace, state: Path) -> Component:
    """The embedded store, on a port fixed now: a restarted store keeps the URL everyone has."""
    return Component(
        "store",
        (
            "registry",
            "serve-store",
            "--data-dir",
            str(state / STORE_SUBDIR),
            "--host",
            args.host,
            "--port",
            str(free_port(args.host)),
        ),
        after("elasticsearch "),
    )


def gateway_component(args: argparse.Namespace, state: Path, es: str) -> Component:
    """The gateway, on --port (a free one fixed now for 0): it restarts on the same port."""
    return Component(
        "gateway",
        (
            "gateway",
            "--host",
            args.host,
            "--port",
            str(args.port or free_port(args.host)),
            # The port Gateway servers name: up's gateway is the ingress the shipped
            # config/gateway.yaml selects on 8080 wherever it listens (--port 9090, or a
            # free port for --port 0), as a Kubernetes Service port maps to its pod.
            "--service-port",
            str(args.service_port),
            "--config",
            str(Path(args.config).resolve()),
            "--certs",
            str(state / "certs"),
            "--es",
            es,
            # Admin needs the admin scope; the CLI sends up's local key (admin.key).
            "--auth-config",
            str(ensure_admin_credential(state)),
        ),
        after("gateway listening on "),
        tier=2,
    )


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
    if args.port:
        check_port_free(args.host, args.port)
    status = 0
    supervisor = Supervisor(
        verbose=args.verbose,
        say=lambda line: out.print(line, highlight=False),
        on_change=lambda: None,  # up.json is written once the mesh is ready
        policy=RestartPolicy(),
    )

    def log_of(component: Component) -> Path:
        return logs / f"{component.name.replace(' ', '-')}.log"

    def launch(component: Component) -> Running:
        if stopping.is_set():
            raise KeyboardInterrupt
        spawned = spawn(component, args.verbose, log_of(component))
        try:
            with out.status(f"starting {component.name}"):
                running = await_ready(spawned, args.verbose)
        except BaseException:
            supervisor.adopt(Running(component, spawned.process, ""), log_of(component))
            raise
        supervisor.adopt(running, log_of(component))
        out.print(f"[green]✓[/] {component.name} [dim]{running.address}[/]", highlight=False)
        return running

    def launch_all(components: Sequence[Component]) -> list[Running]:
        """Starts the workers side by side, in plan order."""
        with out.status(f"starting {len(components)} workers with their sidecars"):
            started = supervisor.start_together(components, log_of)
        if stopping.is_set():
            raise KeyboardInterrupt
        return started

    if args.traces:
        # Every component inherits it: one JSON-lines span file for `meshserve trace`.
        os.environ["MESHSERVE_TRACES"] = f"file:{state / 'traces.jsonl'}"
    janitor: Janitor | None = None
    feed: LoadFeed | None = None
    elastic: ElasticGroup | None = None
    scaling: AutoscaleSettings | None = None
    if args.autoscale is not None:
        scaling = autoscale_settings(Path(args.config), "inference")
    try:
        ensure_mesh_ca(state)
        es = args.es
        if not es:
            es = launch(store_component(args, state)).address
        workers = launch_all(plan_workers(args, es))
        gateway = launch(gateway_component(args, state, es)).address
        # A unit's ready line comes before its worker serves: up is ready once the
        # gateway routes to every worker, or a first call may find no healthy endpoint.
        with out.status("waiting for the gateway to route to every worker"):
            wait_routed(
                gateway,
                own_admin_metadata(state),
                {w.component.name: w.address for w in workers},
                timeout=DISCOVERY_TIMEOUT_S,
                stopping=stopping,
            )
        if args.data_workers:
            _wait_ways_out(workers, stopping)
        # The demo needs a data and a training worker; its readiness wait, an inference one.
        if not args.no_demo and args.data_workers and args.training_workers:
            _demo(gateway, state, args, stopping)

        def write_up() -> None:
            UpStatus.of_units(gateway, es, supervisor.statuses()).write(state)

        supervisor.on_change = write_up
        write_up()
        _print_ready(supervisor.statuses(), gateway, state, time.monotonic() - began)
        sys.stdout.flush()
        janitor = Janitor(StoreSettings.from_env(url=es))
        janitor.start()
        if args.autoscale is not None and scaling is not None:
            feed = LoadFeed(StoreSettings.from_env(url=es), "inference", time.monotonic)
            feed.start()
            es_url = es
            elastic = ElasticGroup(
                kind="inference",
                scaler=Autoscaler(scaling, args.autoscale),
                feed=feed,
                supervisor=supervisor,
                make_component=lambda number: inference_component(args, es_url, number),
                log_of=log_of,
                record=state / "autoscale.jsonl",
            )
            out.print(
                f"autoscaling inference between {args.autoscale.min} and {args.autoscale.max} "
                f"workers (target {scaling.target:g} in flight per worker; decisions in "
                f"{state / 'autoscale.jsonl'})",
                highlight=False,
            )
        while not stopping.wait(0.2):
            supervisor.tick()
            if elastic is not None:
                elastic.tick()
    except KeyboardInterrupt:
        pass
    finally:
        # Signals during the orderly stop would only interrupt it.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        (state / UP_FILE).unlink(missing_ok=True)
        if janitor is not None:
            janitor.stop()
        if feed is not None:
            feed.stop()
        with out.status("stopping"):
            for name, code in supervisor.stop_all():
                out.print(f"{name} stopped with status {code}")
                status = 1
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for name in supervisor.failed:
        out.print(f"[red]{name} had failed[/] (see {logs})", highlight=False)
        status = 1
    out.print("meshserve stopped", highlight=False)
    return status


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _autoscale(text: str) -> Bounds:
    service, sep, bounds = text.partition("=")
    if not sep or service != "inference":
        raise argparse.ArgumentTypeError(
            f"expected inference=MIN:MAX (only inference workers scale), got {text!r}"
        )
    try:
        parsed = Bounds.parse(bounds)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if parsed.min < 1:
        # Scale to zero needs something to hold calls while a worker starts (Knative's
        # activator); the gateway has none, so one worker always stays.
        raise argparse.ArgumentTypeError(f"the minimum must be at least 1, got {parsed.min}")
    return parsed


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "up",
        help="run the whole mesh locally until Ctrl-C",
        description="Runs the local store, the mesh CA, data, training and inference workers "
        "with their sidecars, and a gateway; trains a demo model the first time; Ctrl-C stops "
        "everything.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address the components bind")
    parser.add_argument(
        "--port", type=port_number, default=8080, help="gateway port (0: any free port)"
    )
    parser.add_argument(
        "--service-port",
        type=port_number,
        default=DEFAULT_PORT,
        metavar="N",
        help="the port Gateway servers name for up's gateway, whatever --port it listens on "
        "(as a Kubernetes Service port in front of it; config/gateway.yaml names %(default)s)",
    )
    parser.add_argument(
        "--state-dir",
        default=str(DEFAULT_STATE_DIR),
        help="datasets, models, jobs, certificates and store data (default %(default)s)",
    )
    parser.add_argument(
        "--config", default=str(REPO_CONFIG), help="routing YAML folder (default: config/)"
    )
    parser.add_argument(
        "--es",
        type=store_url,
        default=None,
        help="an Elasticsearch URL instead of the embedded store",
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="worker device"
    )
    parser.add_argument(
        "--inference-workers",
        type=_count,
        default=None,
        metavar="N",
        help="inference workers to start (default 2; with --autoscale, its minimum)",
    )
    parser.add_argument(
        "--autoscale",
        type=_autoscale,
        default=None,
        metavar="inference=MIN:MAX",
        help="inference workers follow the load between MIN and MAX (the policy: the "
        "meshserve.io/autoscale-* annotations of its DestinationRule, docs/configuration.md)",
    )
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
