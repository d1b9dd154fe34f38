"""cli/netns.py: the plan of hosts on a bridge (names, addresses, ip commands), without root."""

from __future__ import annotations

import pytest

from cli.netns import Network


def test_hosts_get_consecutive_addresses_and_the_bridge_the_last_one() -> None:
    network = Network()
    assert [(h.name, h.namespace, h.address, h.veth) for h in network.hosts] == [
        ("a", "ms-a", "10.77.0.1", "ms-a-br"),
        ("b", "ms-b", "10.77.0.2", "ms-b-br"),
        ("c", "ms-c", "10.77.0.3", "ms-c-br"),
        ("d", "ms-d", "10.77.0.4", "ms-d-br"),
    ]
    assert network.bridge == "ms-br0" and network.bridge_address == "10.77.0.254"
    assert network.host("c").exec_prefix() == ("ip", "netns", "exec", "ms-c")


def test_up_makes_every_host_and_down_removes_every_link_and_namespace() -> None:
    network = Network(names=("a", "b"), subnet="10.78.1.0/28", prefix="t")
    up = [" ".join(c) for c in network.up_commands()]
    assert up[:3] == [
        "ip link add t-br0 type bridge",
        "ip addr add 10.78.1.14/28 dev t-br0",
        "ip link set t-br0 up",
    ]
    assert "ip -n t-b addr add 10.78.1.2/28 dev eth0" in up
    assert up.count("ip -n t-a link set lo up") == 1
    down = [" ".join(c) for c in network.down_commands()]
    # Bridge ends explicitly: a namespace a leftover process holds outlives its name.
    assert down == [
        "ip link del t-a-br",
        "ip netns del t-a",
        "ip link del t-b-br",
        "ip netns del t-b",
        "ip link del t-br0",
    ]
    assert network.link_command("b", up=False) == ["ip", "link", "set", "t-b-br", "down"]


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"subnet": "10.77.0.0/30"}, "no room for 4 hosts"),
        ({"subnet": "fd00::/64"}, "no room"),
        ({"names": ("a", "a")}, "distinct"),
        ({"names": ("a-b",)}, "letters and digits"),
        ({"names": ("averyverylongname",)}, "15 bytes"),
    ],
)
def test_bad_plans_are_refused_by_name(kwargs: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Network(**kwargs)  # type: ignore[arg-type]


def test_an_unknown_host_is_named() -> None:
    with pytest.raises(KeyError, match="no host 'z'"):
        Network().host("z")
