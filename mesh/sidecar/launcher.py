"""``meshserve run KIND``: a worker and its sidecar started, watched and stopped as one unit."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shlex
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace

from mesh.errors import FailedPrecondition, Unavailable
from mesh.sidecar.cli import add_sidecar_arguments, plan, running

log = logging.getLogger(__name__)

#: Workers announce their address with one stdout line containing this, then the address.
READY_MARK = "listening on "
WORKER_START_TIMEOUT = 60.0


def worker_command(kind: str, command: str | None, extra: Sequence[str]) -> list[str]:
    """``meshserve worker KIND --port 0 ...`` by default (run with this interpreter)."""
    if command:
        return [*shlex.split(command), *extra]
    return [sys.executable, "-m", "mesh.cli.main", "worker", kind, "--port", "0", *extra]


def parse_ready(line: str) -> str | None:
    """The address in a worker's ready line (``... listening on 127.0.0.1:5000 ...``)."""
    if READY_MARK not in line:
        return None
    rest = line.split(READY_MARK, 1)[1].split()
    return rest[0] if rest else None


async def _await_address(worker: asyncio.subprocess.Process) -> str:
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


async def _pump(worker: asyncio.subprocess.Process) -> None:
    """Keeps relaying the worker's stdout (a full pipe would block it)."""
    assert worker.stdout is not None
    async for raw in worker.stdout:
        sys.stdout.write(raw.decode(errors="replace"))
        sys.stdout.flush()


async def _stop(worker: asyncio.subprocess.Process, grace: float) -> int:
    if worker.returncode is None:
        worker.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(worker.wait(), timeout=grace)
        except TimeoutError:
            log.warning("the worker ignored SIGTERM for %.0f s: killing it", grace)
            worker.kill()
            await worker.wait()
    return worker.returncode or 0


def run(args: argparse.Namespace) -> int:
    extra = shlex.split(args.worker_args)
    command = worker_command(args.kind, args.worker_command, extra)
    args.service = args.service or args.kind
    # Validate every sidecar flag and file before the worker starts; the worker's address
    # is filled in once it announces it.
    sidecar_plan = plan(args, app_address="(the worker)")

    async def main() -> int:
        worker = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
        pump: asyncio.Task[None] | None = None
        try:
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
                await asyncio.wait({signalled, exited}, return_when=asyncio.FIRST_COMPLETED)
                if exited.done():
                    log.error("the worker exited (%s): draining its sidecar", worker.returncode)
                signalled.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await signalled
                # Leaving ``running`` drains the sidecar (DRAINING, deregister, in-flight done)
                # before the worker is stopped, so no forwarded call loses its worker.
            code = await _stop(worker, sidecar_plan.settings.grace_seconds)
            return code
        finally:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
            if pump is not None:
                pump.cancel()

    try:
        return asyncio.run(main())
    finally:
        sidecar_plan.telemetry.shutdown()


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a worker and its sidecar as one unit",
        description="Starts `meshserve worker KIND --port 0 [--worker-args]` (or --worker-command), "
        "waits for its 'listening on ADDRESS' line, then runs its sidecar. SIGTERM drains the "
        "sidecar first, then stops the worker; if the worker dies, the sidecar drains and exits.",
    )
    parser.add_argument("kind", help="worker kind (inference, training, data)")
    parser.add_argument("--service", help="service name in the registry (default: KIND)")
    parser.add_argument(
        "--worker-command",
        metavar="COMMAND",
        help="start the worker with this command line instead of `meshserve worker KIND`",
    )
    add_sidecar_arguments(parser)
    parser.add_argument(
        "--worker-args",
        default="",
        metavar="ARGS",
        help="more arguments for the worker, one shell-quoted string (e.g. '--repo models')",
    )
    parser.set_defaults(handler=run)
