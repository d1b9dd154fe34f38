"""Triton's ``simple`` example model as TorchScript: INPUT0, INPUT1 INT32 [16] → their sum
(OUTPUT0) and difference (OUTPUT1). A second model for end-to-end tests, with the shape
Triton's own client examples use; written into a model repository by :func:`publish_simple`."""

from __future__ import annotations

import torch
from torch import nn

from protos.inference import model_config_pb2 as mc
from workers.inference import testing


class AddSub(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + b, a - b


def publish_simple(repo_url: str, name: str = "simple") -> int:
    """Writes ``simple``'s config.pbtxt (as Triton's example: max_batch_size 8) and
    publishes its next version; returns that version."""
    config = testing.model_config(
        name,
        [("INPUT0", mc.TYPE_INT32, [16]), ("INPUT1", mc.TYPE_INT32, [16])],
        [("OUTPUT0", mc.TYPE_INT32, [16]), ("OUTPUT1", mc.TYPE_INT32, [16])],
        max_batch_size=8,
    )
    return testing.publish(repo_url, config, AddSub())
