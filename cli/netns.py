"""Hosts on one machine: Linux network namespaces with veth pairs on a bridge (``ip netns``).

Each host is a namespace with its loopback up and one interface (``eth0``) on its own
address; the other end of its veth pair sits on a bridge in the root namespace, which holds
the subnet's last address so this machine's own processes (tests, people's clients) reach
every host. Cutting a host's link (:func:`set_link`) is ``ip link set … down`` on its bridge
end: the host is cut off from everyone, as a pulled cable would cut it. The plan is pure
(:class:`Network`: names, addresses, the ``ip`` commands); :func:`create`, :func:`destroy`
run them. ``destroy`` is idempotent and ``create`` starts with it, so a crashed run's
leftovers never block the next one.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Final

from mesh.cli_error import CliError

DEFAULT_SUBNET: Final = "10.77.0.0/24"
DEFAULT_PREFIX: Final = "ms"
DEFAULT_HOSTS: Final = ("a", "b", "c", "d")
#: Interface names are at most 15 bytes (IFNAMSIZ - 1).
_IFNAME_MAX = 15


@dataclass(frozen=True)
class Host:
    """One host: its namespace, its address and the bridge end of its veth pair."""

    name: str
    namespace: str
    address: str
    veth: str

    def exec_prefix(self) -> tuple[str, ...]:
        """Runs a command on this host (in its network namespace)."""
        return ("ip", "netns", "exec", self.namespace)


@dataclass(frozen=True)
class Network:
    """The hosts on one bridge: ``<prefix>-<name>`` namespaces on ``subnet``."""

    names: tuple[str, ...] = DEFAULT_HOSTS
    subnet: str = DEFAULT_SUBNET
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        net = ipaddress.ip_network(self.subnet)  # raises ValueError naming the problem
        if net.version != 4 or net.num_addresses < len(self.names) + 3:
            raise ValueError(f"subnet {self.subnet} has no room for {len(self.names)} hosts")
        if len(set(self.names)) != len(self.names) or not self.names:
            raise ValueError(f"host names must be distinct and at least one: {self.names}")
        for name in self.names:
            if not name.isalnum() or len(self.veth_of(name)) > _IFNAME_MAX:
                raise ValueError(
                    f"host name {name!r}: letters and digits, short enough for "
                    f"{self.veth_of(name)!r} to fit {_IFNAME_MAX} bytes"
                )

    def veth_of(self, name: str) -> str:
        return f"{self.prefix}-{name}-br"

    @property
    def bridge(self) -> str:
        return f"{self.prefix}-br0"

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    @property
    def bridge_address(self) -> str:
        """The root namespace's address on the bridge: the subnet's last usable one."""
        return str(ipaddress.ip_network(self.subnet).broadcast_address - 1)

    @property
    def hosts(self) -> tuple[Host, ...]:
        first = ipaddress.ip_network(self.subnet).network_address + 1
        return tuple(
            Host(name, f"{self.prefix}-{name}", str(first + i), self.veth_of(name))
            for i, name in enumerate(self.names)
        )

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(f"no host {name!r} (hosts: {', '.join(self.names)})")

    def up_commands(self) -> list[list[str]]:
        """The ``ip`` commands that make the bridge and every host, in order."""
        commands = [
            ["ip", "link", "add", self.bridge, "type", "bridge"],
            ["ip", "addr", "add", f"{self.bridge_address}/{self.prefixlen}", "dev", self.bridge],
            ["ip", "link", "set", self.bridge, "up"],
        ]
        for host in self.hosts:
            ns = host.namespace
            commands += [
                ["ip", "netns", "add", ns],
                [
                    "ip",
                    "link",
                    "add",
                    host.veth,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    ns,
                ],
                ["ip", "link", "set", host.veth, "master", self.bridge, "up"],
                ["ip", "-n", ns, "addr", "add", f"{host.address}/{self.prefixlen}", "dev", "eth0"],
                ["ip", "-n", ns, "link", "set", "eth0", "up"],
                # Workers listen on Unix sockets, but sidecars' outbound ports are loopback.
                ["ip", "-n", ns, "link", "set", "lo", "up"],
            ]
        return commands

    def down_commands(self) -> list[list[str]]:
        """The commands that remove everything ``up_commands`` made; each may find nothing.

        The bridge ends go explicitly: a namespace that a leftover process still holds
        outlives ``ip netns del`` (which only drops its name), and with it its veth pair.
        """
        commands = []
        for host in self.hosts:
            commands += [["ip", "link", "del", host.veth], ["ip", "netns", "del", host.namespace]]
        commands.append(["ip", "link", "del", self.bridge])
        return commands

    def link_command(self, name: str, up: bool) -> list[str]:
        return ["ip", "link", "set", self.host(name).veth, "up" if up else "down"]


def unavailable() -> str | None:
    """Why hosts cannot be made here (None: they can): namespaces need root and iproute2."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


def _run(command: list[str], *, check: bool) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise CliError(f"{' '.join(command)}: {done.stderr.strip() or done.returncode}")
    return done


def create(network: Network) -> None:
    """Makes the hosts, after removing whatever a previous run left."""
    reason = unavailable()
    if reason is not None:
        raise CliError(f"cannot make hosts: {reason}")
    destroy(network)
    try:
        for command in network.up_commands():
            _run(command, check=True)
    except BaseException:
        destroy(network)
        raise


def destroy(network: Network) -> None:
    """Removes the hosts and the bridge; absent ones are skipped (idempotent)."""
    for command in network.down_commands():
        _run(command, check=False)


def exists(network: Network) -> bool:
    namespaces = _run(["ip", "netns", "list"], check=False).stdout.split()
    return any(host.namespace in namespaces for host in network.hosts)


def set_link(network: Network, name: str, up: bool) -> None:
    """Cuts (``up=False``) or restores host ``name``'s link to the bridge."""
    _run(network.link_command(name, up), check=True)
