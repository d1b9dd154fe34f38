"""``meshserve hosts up|down``: the mesh across four hosts made on this machine (network namespaces).

Host A runs the store (and the data worker), host B the gateway, hosts C and D an inference
unit each (worker + sidecar) and a training node each: C's takes jobs, D's follows it, so a
job of world size 2 trains one DDP rank on each (gloo over the hosts' network). Every sidecar listens on and
registers its own host's address, every certificate names it (``mesh.security.ca``), and
mutual TLS is STRICT between hosts. With ``--traces`` each host writes its spans to its own
file (``<state>/traces-<host>.jsonl``): one trace's spans are found across them by trace id.
Files are shared (one filesystem), as an object store or a shared volume would be across
real hosts. ``up`` runs the mesh supervised until Ctrl-C, then removes the hosts; ``down``
removes what a crashed run left.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from rich.console import Console

from cli import netns
from cli.admin_credential import ensure_admin_credential, own_admin_metadata
from cli.endpoints import UpStatus
from cli.routed import wait_routed
from cli.supervision.janitor import Janitor
from cli.supervision.policy import RestartPolicy
from cli.supervision.processes import Component, Running, after
from cli.supervision.supervisor import Supervisor
from cli.up import ensure_mesh_ca
from mesh.cli_error import CliError
from registry.connect import StoreSettings
from registry.locate import STORE_SUBDIR
from registry.state_dir import UP_FILE, UpEndpoints

out = Console()

STORE_PORT = 9200
GATEWAY_PORT = 8080
#: Where each part of the mesh runs (host names of ``netns.DEFAULT_HOSTS``).
STORE_HOST = "a"
GATEWAY_HOST = "b"
INFERENCE_HOSTS = ("c", "d")
#: Training: node 0 of a two-node group (takes jobs) and its follower (workers.training.nodes).
TRAINING_HOST = "c"
FOLLOWER_HOST = "d"
RENDEZVOUS_PORT = 29400
#: The training worker's way to the data service: its sidecar's outbound port, on its
#: host's loopback (each host has its own, so the fixed port collides with nothing).
OUTBOUND_PORT = 15001
#: How long the gateway may take to route to every worker once all have started.
ROUTED_TIMEOUT_S = 90.0


def traces_file(state: Path, host: str) -> Path:
    return state / f"traces-{host}.jsonl"


def _unit(
    network: netns.Network,
    state: Path,
    config: Path,
    es: str,
    kind: str,
    host_name: str,
    worker_args: Sequence[str],
    *extra: str,
    traces: bool = False,
    service: str | None = None,
) -> Component:
    host = network.host(host_name)
    env = _traces_env(state, host_name) if traces else ()
    if kind == "training":
        # Gloo finds its own address by the machine's name, which every namespace shares
        # and which resolves to no host's address: name the host's interface instead.
        env = (*env, ("GLOO_SOCKET_IFNAME", "eth0"))
    return Component(
        f"{service or kind} worker on {host_name}",
        (
            "run",
            kind,
            *(("--service", service) if service else ()),
            "--host",
            host.address,
            "--port",
            "0",
            "--mtls",
            "STRICT",
            "--config",
            str(config),
            "--certs",
            str(state / "certs"),
            "--es",
            es,
            "--label",
            f"host={host_name}",
            *extra,
            "--worker-args",
            shlex.join(worker_args),
        ),
        after("sidecar listening on "),
        tier=1,
        prefix=host.exec_prefix(),
        env=env,
    )


def _traces_env(state: Path, host: str) -> tuple[tuple[str, str], ...]:
    return (("MESHSERVE_TRACES", f"file:{traces_file(state, host)}"),)


def plan_mesh(
    network: netns.Network,
    state: Path,
    config: Path,
    *,
    device: str = "cpu",
    traces: bool = False,
) -> tuple[Component, list[Component], Component]:
    """The store, the workers with their sidecars, and the gateway, each on its host;
    with ``traces``, each host records its spans in its own file."""
    store_host = network.host(STORE_HOST)
    es = f"http://{store_host.address}:{STORE_PORT}"
    models = str(state / "models")
    store = Component(
        "store",
        (
            "registry",
            "serve-store",
            "--data-dir",
            str(state / STORE_SUBDIR),
            "--host",
            store_host.address,
            "--port",
            str(STORE_PORT),
        ),
        after("elasticsearch "),
        prefix=store_host.exec_prefix(),
    )
    units = [
        _unit(
            network,
            state,
            config,
            es,
            "data",
            STORE_HOST,
            ["--root", str(state / "data")],
            traces=traces,
        )
    ]
    rendezvous = f"{network.host(TRAINING_HOST).address}:{RENDEZVOUS_PORT}"
    for node_rank, name in enumerate((TRAINING_HOST, FOLLOWER_HOST)):
        units.append(
            _unit(
                network,
                state,
                config,
                es,
                "training",
                name,
                [
                    "--artifacts",
                    str(state / "artifacts" / "training"),
                    "--model-repo",
                    models,
                    "--data",
                    f"127.0.0.1:{OUTBOUND_PORT}",
                    "--device",
                    device,
                    *("--nodes", "2", "--node-rank", str(node_rank)),
                    *("--rendezvous", rendezvous),
                ],
                "--outbound-port",
                str(OUTBOUND_PORT),
                traces=traces,
                # The follower takes no jobs: under another name, the gateway's training
                # route never reaches it.
                service=None if node_rank == 0 else "training-node",
            )
        )
    for name in INFERENCE_HOSTS:
        worker_args = ["--model-repo", models, "--device", device, "--poll-interval", "1"]
        units.append(
            _unit(
                network,
                state,
                config,
                es,
                "inference",
                name,
                [*worker_args, "--threads", "1"],
                traces=traces,
            )
        )
    gateway_host = network.host(GATEWAY_HOST)
    gateway = Component(
        "gateway",
        (
            "gateway",
            "--host",
            gateway_host.address,
            "--port",
            str(GATEWAY_PORT),
            "--config",
            str(config),
            "--certs",
            str(state / "certs"),
            "--es",
            es,
            "--auth-config",
            str(ensure_admin_credential(state)),
        ),
        after("gateway listening on "),
        tier=2,
        prefix=gateway_host.exec_prefix(),
        env=_traces_env(state, GATEWAY_HOST) if traces else (),
    )
    return store, units, gateway


def run_up(args: argparse.Namespace) -> int:
    network = netns.Network(subnet=args.subnet, prefix=args.prefix)
    state = Path(args.state_dir).resolve()
    config = Path(args.config).resolve()
    if not config.is_dir():
        raise CliError(f"routing config folder {config} does not exist")
    if UpEndpoints.read(state) is not None:
        raise CliError(f"a mesh already runs on {state}")
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    supervisor = Supervisor(
        verbose=args.verbose,
        say=lambda line: out.print(line, highlight=False),
        on_change=lambda: None,
        policy=RestartPolicy(),
    )

    def log_of(component: Component) -> Path:
        return logs / f"{component.name.replace(' ', '-')}.log"

    def launch(components: Sequence[Component]) -> list[Running]:
        started = supervisor.start_together(components, log_of)
        if stopping.is_set():
            raise KeyboardInterrupt
        return started

    status = 0
    janitor: Janitor | None = None
    try:
        netns.create(network)
        for host in network.hosts:
            out.print(f"host {host.name}: {host.address} (ip netns exec {host.namespace} …)")
        ensure_mesh_ca(state)
        store, units, gateway_component = plan_mesh(
            network, state, config, device=args.device, traces=args.traces
        )
        (es,) = (r.address for r in launch([store]))
        workers = launch(units)
        (gateway,) = (r.address for r in launch([gateway_component]))
        # Ready lines come before the workers serve: the mesh is up once the gateway
        # routes to each of them, or a first call may find no healthy endpoint.
        out.print("waiting for the gateway to route to every worker", highlight=False)
        wait_routed(
            gateway,
            own_admin_metadata(state),
            {w.component.name: w.address for w in workers},
            timeout=ROUTED_TIMEOUT_S,
            stopping=stopping,
        )

        def write_up() -> None:
            UpStatus.of_units(gateway, es, supervisor.statuses()).write(state)

        supervisor.on_change = write_up
        write_up()
        out.print(
            f"meshserve is up across {len(network.hosts)} hosts: gateway {gateway}, store {es}; "
            f"state {state}. Try: MESHSERVE_STATE_DIR={state} meshserve status. Ctrl-C stops.",
            highlight=False,
        )
        janitor = Janitor(StoreSettings.from_env(url=es))
        janitor.start()
        while not stopping.wait(0.2):
            supervisor.tick()
    except KeyboardInterrupt:
        pass
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        (state / UP_FILE).unlink(missing_ok=True)
        if janitor is not None:
            janitor.stop()
        for name, code in supervisor.stop_all():
            out.print(f"{name} stopped with status {code}")
            status = 1
        netns.destroy(network)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    out.print("meshserve stopped; hosts removed", highlight=False)
    return status


def run_down(args: argparse.Namespace) -> int:
    netns.destroy(netns.Network(subnet=args.subnet, prefix=args.prefix))
    out.print("hosts removed")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "hosts",
        help="the mesh across four hosts made on this machine (network namespaces; root)",
        description="Makes hosts A-D as network namespaces on a bridge and runs the mesh "
        "across them: the store on A, the gateway on B, inference units on C and D, "
        "mutual TLS STRICT between them. Needs root and iproute2.",
    )
    commands = parser.add_subparsers(dest="hosts_command", required=True)
    up = commands.add_parser("up", help="make the hosts and run the mesh until Ctrl-C")
    down = commands.add_parser("down", help="remove the hosts (what a crashed run left)")
    for each in (up, down):
        each.add_argument("--subnet", default=netns.DEFAULT_SUBNET, help="(default %(default)s)")
        each.add_argument(
            "--prefix", default=netns.DEFAULT_PREFIX, help="namespace and link name prefix"
        )
    up.add_argument("--state-dir", default=".meshserve-hosts", help="(default %(default)s)")
    up.add_argument(
        "--config",
        default=str(Path(__file__).resolve().parents[1] / "config"),
        help="routing YAML folder (default: config/)",
    )
    up.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="worker device")
    up.add_argument(
        "--traces",
        action="store_true",
        help="record each host's spans in <state>/traces-<host>.jsonl",
    )
    up.set_defaults(handler=run_up)
    down.set_defaults(handler=run_down)
