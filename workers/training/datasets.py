"""Looks up dataset versions in the data service, mapping its statuses to domain errors."""

from __future__ import annotations

from typing import Protocol

import grpc
import grpc.aio

from mesh.errors import InvalidArgument, NotFound, Unavailable
from mesh.telemetry.propagation import inject
from protos.meshserve.data.v1 import data_pb2, data_pb2_grpc


class Datasets(Protocol):
    async def get(self, name: str, version: str) -> data_pb2.Dataset:
        """The dataset version (empty version: the latest); NotFound when there is none."""


class DataServiceDatasets:
    """Datasets behind a data service channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = data_pb2_grpc.DataServiceStub(channel)

    async def get(self, name: str, version: str) -> data_pb2.Dataset:
        try:
            dataset: data_pb2.Dataset = await self._stub.GetDataset(
                data_pb2.GetDatasetRequest(name=name, version=version),
                timeout=30,
                # The trace of the call being served, if any (propagation.continued).
                metadata=inject(),
            )
        except grpc.aio.AioRpcError as exc:
            label = f"dataset {name!r}" + (f" version {version!r}" if version else "")
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"{label} not found") from exc
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(f"dataset: {exc.details()}") from exc
            raise Unavailable(f"data service: {exc.code().name}: {exc.details()}") from exc
        return dataset
