"""``meshserve run KIND``: a worker and its sidecar started, watched and stopped as one unit."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from mesh.errors import FailedPrecondition, Unavailable
from mesh.server import eventloop
from mesh.server.lifeline import FOLDER_ENV, Lifeline, die_with_parent
from mesh.server.private import PrivateSocket
from mesh.server.sidecar_secret import write_secret
from mesh.sidecar.cli import SidecarPlan, add_sidecar_arguments, plan, running
from mesh.sidecar.liveness import DEFAULT_WINDOW_S, HUNG_EXIT_STATUS, window_from_text

log = logging.getLogger(__name__)

#: Workers announce their address with one stdout line containing this, then the address.
READY_MARK = "listening on "
#: A custom ``--worker-command`` finds the address to listen on (``unix:PATH``) here.
LISTEN_ENV = "MESHSERVE_WORKER_LISTEN"
#: ...or, with ``--worker-listen tcp``, the file holding the secret calls must carry.
SECRET_FILE_ENV = "MESHSERVE_SIDECAR_SECRET_FILE"
WORKER_LISTEN_MODES = ("unix", "tcp")
#: ``--liveness-window``'s default when set: ``meshserve up`` and ``hosts up`` pass their
#: environment to every unit, so one variable sets it for the whole mesh.
LIVENESS_ENV = "MESHSERVE_LIVENESS_WINDOW"
Process = asyncio.subprocess.Process
WORKER_START_TIMEOUT = 60.0


@dataclass(frozen=True)
class Door:
    """How the sidecar reaches its worker and nothing else does (docs/security.md)."""

    #: Flags for ``meshserve worker KIND``.
    flags: tuple[str, ...]
    #: The same told to a custom ``--worker-command`` (any program), in its environment.
    env: dict[str, str]
    #: What the sidecar sends with every call (TCP mode), else None.
    secret: str | None = field(default=None, repr=False)


def door(mode: str, private: PrivateSocket) -> Door:
    """``unix``: a socket in ``private``'s folder (0700). ``tcp``: any free loopback port,
    and a secret in that folder that the worker requires and the sidecar sends."""
    # The worker removes the folder too when it exits, should this process be gone first.
    folder = {FOLDER_ENV: str(private.folder)}
    if mode == "unix":
        return Door(("--listen", private.address), {LISTEN_ENV: private.address, **folder})
    secret_file = private.folder / "sidecar-secret"
    secret = write_secret(secret_file)
    return Door(
        ("--port", "0", "--sidecar-secret-file", str(secret_file)),
        {SECRET_FILE_ENV: str(secret_file), **folder},
        secret,
    )


def worker_command(kind: str, command: str | None, extra: Sequence[str], door: Door) -> list[str]:
    """``meshserve worker KIND --listen unix:PATH ...`` by default (this interpreter).

    A custom ``command`` gets no flag (it may be any program): it finds the same in its
    environment (``door.env``) and announces where it listens in its ready line.
    """
    if command:
        return [*shlex.split(command), *extra]
    return [sys.executable, "-m", "cli.main", "worker", kind, *door.flags, *extra]


def parse_ready(line: str) -> str | None:
    """The address in a worker's ready line (``... listening on 127.0.0.1:5000 ...``)."""
    if READY_MARK not in line:
        return None
    rest = line.split(READY_MARK, 1)[1].split()
    return rest[0] if rest else None


async def _await_address(worker: Process) -> str:
    assert worker.stdout is not None
    while True:
        raw = await worker.stdout.readline()
        if not raw:
            code = await worker.wait()
            raise FailedPrecondition(f"the worker exited with status {code} before it listened")
        line = raw.decode(errors="replace").rstrip()
        print(line, flush=True)  # the worker's own output stays visible
        address = parse_ready(line)
        if address is not None:
            return address


async def _pump(worker: Process) -> None:
    """Keeps relaying the worker's stdout (a full pipe would block it)."""
    assert worker.stdout is not None
    async for raw in worker.stdout:
        sys.stdout.write(raw.decode(errors="replace"))
        sys.stdout.flush()


async def _stop(worker: Process, grace: float) -> int:
    """Stops the worker (SIGTERM, SIGKILL after ``grace``); returns the unit's exit status.

    0 when the worker stopped as asked; else the worker's own status, a death by signal N
    as 128 + N, as a shell reports it (returned as is, -9 would reach the supervisor as 247).
    """
    asked = worker.returncode is None
    if asked:
        worker.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(worker.wait(), timeout=grace)
        except TimeoutError:
            log.warning("the worker ignored SIGTERM for %.0f s: killing it", grace)
            worker.kill()
            await worker.wait()
    return unit_status(worker.returncode or 0, asked=asked)


def unit_status(worker_status: int, *, asked: bool) -> int:
    """The unit's exit status for its worker's (see :func:`_stop`)."""
    if worker_status >= 0:
        return worker_status
    if asked and -worker_status == signal.SIGTERM:
        return 0
    return 128 - worker_status


def run(args: argparse.Namespace) -> int:
    extra = shlex.split(args.worker_args)
    args.service = args.service or args.kind
    # Validate every sidecar flag and file before the worker starts; the worker's address
    # is filled in once it announces it.
    sidecar_plan = plan(args, app_address="(the worker)")
    # The worker listens in a folder only this user can enter: no local process but the
    # sidecar (and root) can reach it, so none skips mTLS and AuthorizationPolicy.
    private = PrivateSocket.create("meshserve-worker-", "worker.sock")
    try:
        unit_door = door(args.worker_listen, private)
        sidecar_plan.settings = replace(
            sidecar_plan.settings,
            app_secret=unit_door.secret,
            liveness_window=args.liveness_window,
        )
        command = worker_command(args.kind, args.worker_command, extra, unit_door)
        return eventloop.run(_run_unit(command, unit_door, sidecar_plan))
    finally:
        private.remove()
        sidecar_plan.telemetry.shutdown()


async def _spawn(command: list[str], env: dict[str, str], lifeline: Lifeline) -> Process:
    """Starts the worker tied to this process: it dies with it, however this one ends.

    Called on the event loop's thread, the main thread, which lives as long as the
    process: ``PR_SET_PDEATHSIG`` fires when the forking *thread* ends.
    """
    try:
        return await asyncio.create_subprocess_exec(
            *command,
            stdout=asyncio.subprocess.PIPE,
            env={**lifeline.child_env(), **env},
            pass_fds=lifeline.pass_fds,
            preexec_fn=die_with_parent,
        )
    finally:
        lifeline.spawned()


async def _run_unit(command: list[str], door: Door, sidecar_plan: SidecarPlan) -> int:
    """Worker, then sidecar; returns the exit status. No path out leaves the worker running."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    stopped_by: list[int] = []

    def stop_now(sig: int) -> None:
        # Outside the sidecar's watch (start-up, or a second signal while stopping), a
        # signal abandons what is under way; the ``finally`` below still stops the worker.
        stopped_by.append(sig)
        main.cancel()

    def take_signals() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_now, sig)

    take_signals()
    lifeline = Lifeline()
    worker: Process | None = None
    pump: asyncio.Task[None] | None = None
    killed_hung = False
    try:
        worker = await _spawn(command, door.env, lifeline)
        try:
            address = await asyncio.wait_for(_await_address(worker), WORKER_START_TIMEOUT)
        except TimeoutError as exc:
            raise Unavailable(
                f"the worker did not print '{READY_MARK}ADDRESS' within "
                f"{WORKER_START_TIMEOUT:.0f} s: {shlex.join(command)}"
            ) from exc
        pump = asyncio.create_task(_pump(worker))
        sidecar_plan.settings = replace(sidecar_plan.settings, app_address=address)
        async with running(sidecar_plan) as sidecar:
            signalled = asyncio.create_task(sidecar.run_until_signal())
            exited = asyncio.create_task(worker.wait())
            hung = asyncio.create_task(sidecar.hung.wait())
            await asyncio.wait({signalled, exited, hung}, return_when=asyncio.FIRST_COMPLETED)
            if hung.done() and not exited.done() and not signalled.done():
                # A livenessProbe's restart: SIGKILL, since a hung worker would not act on
                # SIGTERM (a stopped one cannot); its death ends the unit as a crash does
                # (HUNG_EXIT_STATUS says why), so the supervisor restarts it with backoff,
                # counted toward its restart limit.
                log.error(
                    "the worker answered no health check for %.0f s (liveness window): "
                    "killing it; its sidecar drains and the unit exits to be restarted",
                    sidecar.hang.silent_s if sidecar.hang is not None else 0.0,
                )
                worker.kill()
                killed_hung = True
                await exited
            if exited.done():
                log.error("the worker exited (%s): draining its sidecar", worker.returncode)
            for task in (signalled, hung):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            take_signals()  # the sidecar released them
            # Leaving ``running`` drains the sidecar (DRAINING, deregister, in-flight done)
            # before the worker is stopped, so no forwarded call loses its worker.
        status = await _stop(worker, sidecar_plan.settings.grace_seconds)
        return HUNG_EXIT_STATUS if killed_hung else status
    except asyncio.CancelledError:
        if not stopped_by:
            raise
        log.warning("signal %d: stopping the worker now", stopped_by[0])
        return 128 + stopped_by[0]
    finally:
        if worker is not None and worker.returncode is None:
            worker.kill()
            await worker.wait()
        lifeline.close()
        if pump is not None:
            pump.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _liveness_window(text: str) -> float:
    try:
        return window_from_text(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a worker and its sidecar as one unit",
        description="Starts `meshserve worker KIND --listen unix:PATH [--worker-args]` (or "
        "--worker-command, told the address in $MESHSERVE_WORKER_LISTEN), waits for its "
        "'listening on ADDRESS' line, then runs its sidecar. The socket sits in a fresh folder "
        "only this user can enter: the worker is reachable through its sidecar only. SIGTERM "
        "drains the sidecar first, then stops the worker; if the worker dies, the sidecar "
        "drains and exits; if this process dies, even by SIGKILL, the worker exits too.",
    )
    parser.add_argument("kind", help="worker kind (inference, training, data)")
    parser.add_argument("--service", help="service name in the registry (default: KIND)")
    parser.add_argument(
        "--worker-command",
        metavar="COMMAND",
        help="start the worker with this command line instead of `meshserve worker KIND`",
    )
    parser.add_argument(
        "--worker-listen",
        choices=WORKER_LISTEN_MODES,
        default="unix",
        help="unix (default): the worker listens on a Unix socket in a private folder; tcp: "
        "on a free 127.0.0.1 port, serving only calls that carry a secret its sidecar sends",
    )
    add_sidecar_arguments(parser)
    parser.add_argument(
        "--liveness-window",
        type=_liveness_window,
        default=os.environ.get(LIVENESS_ENV, str(DEFAULT_WINDOW_S)),
        metavar="SECONDS",
        help="kill the worker, so that the unit is restarted, once it has answered no "
        "health check for this long (Kubernetes' livenessProbe: 10 s x 3 by default); "
        f"0: never (default ${LIVENESS_ENV}, else {DEFAULT_WINDOW_S:.0f})",
    )
    parser.add_argument(
        "--worker-args",
        default="",
        metavar="ARGS",
        help="more arguments for the worker, one shell-quoted string (e.g. '--repo models')",
    )
    parser.set_defaults(handler=run)
