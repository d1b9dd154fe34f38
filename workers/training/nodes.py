"""Training across hosts: a static group of training nodes, as torchrun's ``--nnodes``,
``--node-rank`` and ``--rdzv-endpoint`` describe one.

Node 0 is an ordinary training worker (it takes jobs, reports, checkpoints, publishes). A
job whose ``world_size`` is ``nodes * ranks_per_node`` runs ``ranks_per_node`` ranks on
every node: node 0's ranks open torch.distributed's TCP rendezvous on ``rendezvous`` (an
address of node 0 that the others reach) and broadcast the job's run configuration; each
other node runs a follower (:mod:`workers.training.follower`) whose ranks join that
rendezvous, receive the configuration and train their shards beside node 0's, reading
batches from their own data service address. Gloo on CPUs, NCCL on GPUs, as on one host.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NodeGroup:
    nodes: int
    node_rank: int
    #: ``host:port`` of node 0's rendezvous.
    rendezvous: str
    ranks_per_node: int = 1

    def __post_init__(self) -> None:
        if self.nodes < 2:
            raise ValueError(f"a node group has at least 2 nodes, got {self.nodes}")
        if not 0 <= self.node_rank < self.nodes:
            raise ValueError(f"node rank must be in [0, {self.nodes}), got {self.node_rank}")
        if self.ranks_per_node < 1:
            raise ValueError(f"ranks per node must be >= 1, got {self.ranks_per_node}")
        host, _, port = self.rendezvous.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"rendezvous must be HOST:PORT, got {self.rendezvous!r}")

    @property
    def world_size(self) -> int:
        """The one world size that spans the group; other jobs run on node 0 alone."""
        return self.nodes * self.ranks_per_node

    @property
    def ranks(self) -> tuple[int, ...]:
        """The global ranks this node runs (torchrun's order: node-major)."""
        first = self.node_rank * self.ranks_per_node
        return tuple(range(first, first + self.ranks_per_node))

    @property
    def init_method(self) -> str:
        return f"tcp://{self.rendezvous}"
