"""Elastic scaling under a load step: workers follow the callers up and back down.

Run: ``.venv/bin/python -m bench.autoscale [--low 4] [--high 64] [--max 4]`` (needs the
``bench`` extra for the plot: ``pip install -e '.[bench]'``).

Starts ``meshserve up --autoscale inference=1:MAX`` (a fresh state folder, the demo model
trained), then calls ModelInfer through its gateway from ``--low`` callers, steps to
``--high`` callers for ``--high-seconds``, and back to ``--low`` until the workers are back to
one. Reports: the time from the step to the first new worker serving (the gateway routes to
it) and to all of them, cold loads on the request path after the joins (target 0: a worker
loads its versions before it reports ready), failed requests during scale-up and
scale-down (target 0), and p99 latency per phase, side by side in one run: one worker under
the low load, the high load before and after the scale-up, the low load after the
scale-down. Writes ``--plot`` (docs/autoscale.png): replicas and p99 over time.

The policy's windows are shortened (``--window`` etc., annotations on the inference
DestinationRule of a copied config) so that a run takes minutes: with the defaults (a 60 s
window, 300 s scale-down stabilisation) the way down alone takes over six minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.children import REPO
from bench.mesh_process import MeshProcess
from tests.support.load import InferLoad, Outcome, routed_inference_ports
from workers.inference.repository import COLD_LOAD

READY_TIMEOUT_S = 300.0
out = Console()


def policy_config(folder: Path, args: argparse.Namespace) -> Path:
    """The repository's routing config with the bench's policy on the inference rule."""
    shutil.copytree(REPO / "config", folder)
    inference = folder / "inference.yaml"
    anchor = "    meshserve.io/retry-order: ring-successor\n"
    text = inference.read_text()
    if anchor not in text:
        raise RuntimeError(f"{inference} changed: no {anchor.strip()!r} line to add to")
    policy = "".join(
        f'    meshserve.io/autoscale-{key}: "{value}"\n'
        for key, value in (
            ("target", args.target),
            ("window", args.window),
            ("panic-window", args.panic_window),
            ("scale-down-stabilization", args.scale_down),
        )
    )
    inference.write_text(text.replace(anchor, anchor + policy))
    return folder


class Mesh(MeshProcess):
    """``meshserve up --autoscale`` in a subprocess."""

    def __init__(self, state: Path, config: Path, log: Path, maximum: int) -> None:
        super().__init__(
            [
                *("up", "--port", "0", "--demo-epochs", "1", "--config", str(config)),
                *("--autoscale", f"inference=1:{maximum}"),
            ],
            state,
            log,
            stop_timeout=90,
        )

    def running_inference(self) -> int:
        return sum(
            1
            for u in self.up()["units"]
            if u["slug"].startswith("inference-") and u["state"] == "running"
        )


@dataclass(frozen=True)
class Sample:
    at: float
    units: int
    routed: int


class Sampler:
    """Every half second: running inference units (up.json), endpoints the gateway routes to."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        gateway = self.mesh.up()["gateway"]
        while not self._stop.wait(0.5):
            try:
                units = self.mesh.running_inference()
            except (OSError, ValueError):
                continue
            routed = len(routed_inference_ports(gateway, self.mesh.state))
            self.samples.append(Sample(time.monotonic(), units, routed))

    def first(self, since: float, routed_at_least: int) -> float | None:
        return next(
            (s.at - since for s in self.samples if s.at >= since and s.routed >= routed_at_least),
            None,
        )


def p99(outcomes: list[Outcome]) -> float:
    latencies = sorted(o.ended - o.started for o in outcomes if o.code is None)
    if not latencies:
        return float("nan")
    return latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000


def first_scale_up(record: Path, marks: dict[str, float], wall_offset: float) -> float | None:
    """Seconds from the step to the first decision for more than one worker."""
    step = marks["step_up"] + wall_offset
    for line in record.read_text().splitlines():
        decision = json.loads(line)
        if decision["time"] >= step and decision["desired"] > 1:
            return float(decision["time"] - step)
    return None


def wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.5)


def plot(
    path: Path,
    samples: list[Sample],
    outcomes: list[Outcome],
    marks: dict[str, float],
    args: argparse.Namespace,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zero = marks["start"]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    top.step(
        [s.at - zero for s in samples],
        [s.units for s in samples],
        where="post",
        label="inference workers running",
    )
    top.step(
        [s.at - zero for s in samples],
        [s.routed for s in samples],
        where="post",
        label="routed by the gateway",
        linestyle="--",
    )
    top.set_ylabel("replicas")
    top.set_ylim(0, args.max + 1)
    top.legend(loc="upper right")
    bucket = 2.0
    end = max(o.ended for o in outcomes)
    times, values = [], []
    t = zero
    while t < end:
        inside = [o for o in outcomes if t <= o.ended < t + bucket]
        if inside:
            times.append(t + bucket / 2 - zero)
            values.append(p99(inside))
        t += bucket
    bottom.plot(times, values, label=f"p99 latency per {bucket:.0f} s")
    bottom.set_ylabel("ms")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper right")
    for axis in (top, bottom):
        axis.axvline(marks["step_up"] - zero, color="grey", linestyle=":")
        axis.axvline(marks["step_down"] - zero, color="grey", linestyle=":")
    top.set_title(
        f"up --autoscale inference=1:{args.max}: {args.low} → {args.high} → {args.low} callers"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--low", type=int, default=4)
    parser.add_argument("--high", type=int, default=64)
    parser.add_argument("--max", type=int, default=4, help="most inference workers")
    parser.add_argument("--low-seconds", type=float, default=15.0)
    parser.add_argument("--high-seconds", type=float, default=60.0)
    parser.add_argument("--down-timeout", type=float, default=180.0)
    parser.add_argument("--target", default="2", help="in flight per worker")
    parser.add_argument("--window", default="20s")
    parser.add_argument("--panic-window", default="2s")
    parser.add_argument("--scale-down", default="20s", help="scale-down stabilization")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "autoscale.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = policy_config(Path(tmp) / "config", args)
        mesh = Mesh(Path(tmp) / "state", config, Path(tmp) / "up.log", args.max)
        try:
            with out.status("starting meshserve up (trains the demo model)"):
                mesh.wait_ready(READY_TIMEOUT_S)
            gateway = mesh.up()["gateway"]
            marks: dict[str, float] = {}
            # autoscale.jsonl has wall-clock times; the marks are monotonic.
            wall_offset = time.time() - time.monotonic()
            with Sampler(mesh) as sampler, InferLoad(gateway, callers=args.low, pause_s=0) as low:
                marks["start"] = time.monotonic()
                with out.status(f"{args.low} callers"):
                    time.sleep(args.low_seconds)
                marks["step_up"] = time.monotonic()
                with (
                    out.status(f"{args.high} callers"),
                    InferLoad(gateway, callers=args.high - args.low, pause_s=0) as high,
                ):
                    time.sleep(args.high_seconds)
                marks["step_down"] = time.monotonic()
                with out.status(f"{args.low} callers until one worker is left"):
                    wait(lambda: mesh.running_inference() == 1, args.down_timeout, "scale-down")
                    time.sleep(3)
                marks["end"] = time.monotonic()
            decided = first_scale_up(mesh.state / "autoscale.jsonl", marks, wall_offset)
            logs = sorted((mesh.state / "logs").glob("inference-worker-*.log"))
            cold = sum(log.read_text().count(COLD_LOAD) for log in logs)
            scaled = mesh.log.read_text().count("started (scale-up)")
        finally:
            mesh.stop()
    outcomes = low.outcomes + high.outcomes
    up_phase = [o for o in outcomes if marks["step_up"] <= o.started < marks["step_down"]]
    down_phase = [o for o in outcomes if o.started >= marks["step_down"]]
    first = sampler.first(marks["step_up"], 2)
    full = sampler.first(marks["step_up"], max(s.routed for s in sampler.samples))
    grown = next(
        (
            s.at
            for s in sampler.samples
            if s.at >= marks["step_up"] and s.routed >= max(x.routed for x in sampler.samples)
        ),
        marks["step_down"],
    )
    table = Table(
        title=f"Load step {args.low} → {args.high} → {args.low} callers, "
        f"up --autoscale inference=1:{args.max} (target {args.target} in flight)"
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row(
        "step to the scale-up decision", f"{decided:.1f} s" if decided is not None else "never"
    )
    table.add_row("step to the first new worker routed", f"{first:.1f} s" if first else "never")
    table.add_row(
        f"step to {max(s.routed for s in sampler.samples)} workers routed",
        f"{full:.1f} s" if full else "never",
    )
    table.add_row("workers started by the autoscaler", str(scaled))
    table.add_row("cold loads on the request path (all workers)", str(cold))
    table.add_row(
        "requests during scale-up (failed)",
        f"{len(up_phase)} ({sum(o.code is not None for o in up_phase)})",
    )
    table.add_row(
        "requests during scale-down (failed)",
        f"{len(down_phase)} ({sum(o.code is not None for o in down_phase)})",
    )
    phases = (
        (f"p99, {args.low} callers, 1 worker", marks["start"], marks["step_up"]),
        (f"p99, {args.high} callers, before the new workers", marks["step_up"], grown),
        (f"p99, {args.high} callers, all workers", grown, marks["step_down"]),
        (f"p99, {args.low} callers, scaling down", marks["step_down"], marks["end"]),
    )
    for label, start, end in phases:
        inside = [o for o in outcomes if start <= o.started < end]
        table.add_row(label, f"{p99(inside):.1f} ms ({len(inside)} calls)")
    out.print(table)
    plot(args.plot, sampler.samples, outcomes, marks, args)
    out.print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
