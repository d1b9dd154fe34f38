"""workers/training/nodes.py: a static group of training nodes (torchrun's static config)."""

from __future__ import annotations

import pytest

from workers.training.nodes import NodeGroup


def test_ranks_are_node_major_and_the_group_spans_one_world_size() -> None:
    leader = NodeGroup(nodes=2, node_rank=0, rendezvous="10.77.0.3:29400", ranks_per_node=2)
    follower = NodeGroup(nodes=2, node_rank=1, rendezvous="10.77.0.3:29400", ranks_per_node=2)
    assert leader.ranks == (0, 1) and follower.ranks == (2, 3)
    assert leader.world_size == follower.world_size == 4
    assert leader.init_method == "tcp://10.77.0.3:29400"


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"nodes": 1, "node_rank": 0, "rendezvous": "h:1"}, "at least 2 nodes"),
        ({"nodes": 2, "node_rank": 2, "rendezvous": "h:1"}, r"node rank must be in \[0, 2\)"),
        ({"nodes": 2, "node_rank": 0, "rendezvous": "h"}, "HOST:PORT"),
        ({"nodes": 2, "node_rank": 0, "rendezvous": "h:99999"}, "HOST:PORT"),
        ({"nodes": 2, "node_rank": 0, "rendezvous": "h:1", "ranks_per_node": 0}, "ranks per node"),
    ],
)
def test_bad_groups_are_refused_by_name(kwargs: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        NodeGroup(**kwargs)  # type: ignore[arg-type]
