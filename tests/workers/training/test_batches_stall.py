"""A data stream that neither sends nor fails ends the training attempt (it is retried from
the checkpoint) instead of holding the job forever: a real gRPC server that accepts
StreamBatches and then says nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from protos.meshserve.data.v1 import data_pb2
from workers.training.batches import DataClient, StalledStream, StreamRequest
from workers.training.process import _transient

SERVICE = data_pb2.DESCRIPTOR.services_by_name["DataService"].full_name


class Silent:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.streams = 0

    def stream_batches(
        self, request: data_pb2.StreamBatchesRequest, context: grpc.ServicerContext
    ) -> Iterator[data_pb2.Batch]:
        self.streams += 1
        self.release.wait(30)  # accepted, then silent (until the test ends)
        yield from ()


def test_a_silent_stream_raises_a_transient_error_naming_the_service() -> None:
    servicer = Silent()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_stream_rpc_method_handler(
        servicer.stream_batches,
        request_deserializer=data_pb2.StreamBatchesRequest.FromString,
        response_serializer=data_pb2.Batch.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE, {"StreamBatches": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = DataClient(f"127.0.0.1:{port}", stall_timeout=0.3)
    try:
        request = StreamRequest(dataset="blobs", version="1", split=1, batch_size=8)
        started = time.monotonic()
        with pytest.raises(StalledStream, match=r"sent no batch of blobs for 0.3 s") as stalled:
            next(iter(client.batches(request)))
        assert servicer.streams == 1
        assert time.monotonic() - started < 25  # not the server's 30 s: the client gave up
        # The job process exits for a retry from the checkpoint, as when the service is gone.
        assert _transient(stalled.value)
    finally:
        servicer.release.set()
        client.close()
        server.stop(0)
