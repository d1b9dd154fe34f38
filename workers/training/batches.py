"""Reads batches from the data service (StreamBatches) as torch tensors, prefetched in a thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from protos.meshserve.data.v1 import data_pb2, data_pb2_grpc

#: Little-endian numpy dtypes of the wire types (bf16 is widened on arrival).
NUMPY_DTYPES: dict[int, str] = {
    data_pb2.DATA_TYPE_BOOL: "|b1",
    data_pb2.DATA_TYPE_UINT8: "|u1",
    data_pb2.DATA_TYPE_INT8: "|i1",
    data_pb2.DATA_TYPE_INT16: "<i2",
    data_pb2.DATA_TYPE_INT32: "<i4",
    data_pb2.DATA_TYPE_INT64: "<i8",
    data_pb2.DATA_TYPE_FP16: "<f2",
    data_pb2.DATA_TYPE_FP32: "<f4",
    data_pb2.DATA_TYPE_FP64: "<f8",
}
#: A data service that answers nothing for this long (a stream that neither sends nor
#: fails, a port now held by something else) ends the attempt with UNAVAILABLE, so the
#: job restarts from its checkpoint instead of waiting forever.
STALL_TIMEOUT_S = 30.0
#: GetDataset's deadline.
CALL_TIMEOUT_S = 30.0
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]


def decode(tensor: data_pb2.Tensor) -> torch.Tensor:
    """A wire tensor (raw little-endian bytes) as a torch tensor that owns its memory."""
    shape = [int(d) for d in tensor.shape]
    if tensor.data_type == data_pb2.DATA_TYPE_BF16:
        # numpy has no bfloat16: take the 16 bits as the top half of a float32.
        bits = np.frombuffer(tensor.raw_data, dtype="<u2").astype(np.uint32) << 16
        return torch.from_numpy(bits.view(np.float32).reshape(shape))
    dtype = NUMPY_DTYPES.get(tensor.data_type)
    if dtype is None:
        raise ValueError(f"tensor {tensor.name!r} has unsupported data type {tensor.data_type}")
    array = np.frombuffer(tensor.raw_data, dtype=dtype).reshape(shape)
    # frombuffer is read-only over the message's bytes; copy once into memory torch owns.
    return torch.from_numpy(array.copy())


@dataclass(frozen=True)
class StreamRequest:
    """One epoch of one split for one shard."""

    dataset: str
    version: str
    split: int
    batch_size: int
    shuffle: bool = False
    seed: int = 0
    epoch: int = 0
    num_shards: int = 1
    shard_index: int = 0

    def to_proto(self) -> data_pb2.StreamBatchesRequest:
        return data_pb2.StreamBatchesRequest(
            dataset=self.dataset,
            version=self.version,
            split=self.split,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch,
            standardize=False,  # the network standardises, so served models take raw input
            drop_last=False,
            num_shards=self.num_shards,
            shard_index=self.shard_index,
        )


Batch = dict[str, torch.Tensor]


class StalledStream(ConnectionError):
    """The data service stopped sending without ending or failing the stream."""


class DataClient:
    """A blocking client for the training process (which runs no event loop)."""

    def __init__(self, address: str, stall_timeout: float = STALL_TIMEOUT_S) -> None:
        self.address = address
        self.stall_timeout = stall_timeout
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = data_pb2_grpc.DataServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def get_dataset(self, name: str, version: str) -> data_pb2.Dataset:
        reply: data_pb2.Dataset = self._stub.GetDataset(
            data_pb2.GetDatasetRequest(name=name, version=version), timeout=CALL_TIMEOUT_S
        )
        return reply

    def batches(self, request: StreamRequest, prefetch: int = 4) -> Iterator[Batch]:
        """Yields decoded batches; the next ones arrive and decode while this one trains.

        Closing the generator early cancels the stream. No batch for ``stall_timeout``
        seconds raises StalledStream (the stream is cancelled).
        """
        stream = self._stub.StreamBatches(request.to_proto())
        out: queue.Queue[Batch | BaseException | None] = queue.Queue(maxsize=prefetch)
        stop = threading.Event()

        def pump() -> None:
            try:
                for batch in stream:
                    item = {t.name: decode(t) for t in batch.tensors}
                    while not stop.is_set():
                        try:
                            out.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                out.put(None)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                if not stop.is_set():
                    out.put(exc)

        thread = threading.Thread(target=pump, name="batch-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                try:
                    item = out.get(timeout=self.stall_timeout)
                except queue.Empty:
                    raise StalledStream(
                        f"the data service at {self.address} sent no batch of "
                        f"{request.dataset} for {self.stall_timeout:g} s"
                    ) from None
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            stream.cancel()
            thread.join(timeout=5)
