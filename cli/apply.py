"""``meshserve apply -f FILE``: routing YAML applied to the running gateway (``config apply``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.route import apply_config, gateway_option


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "apply",
        help="apply routing YAML to the running gateway (like kubectl apply -f)",
        description="Validates the YAML files and applies them over the gateway's running "
        "config through its admin API; same as `meshserve config apply`.",
    )
    parser.add_argument(
        "-f",
        "--filename",
        dest="files",
        action="append",
        type=Path,
        required=True,
        help="YAML file (repeatable)",
    )
    gateway_option(parser)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate on the gateway and print how routing would change, without applying",
    )
    parser.add_argument(
        "--expected-version", type=int, default=0, help="apply only over this version"
    )
    parser.set_defaults(handler=apply_config)
