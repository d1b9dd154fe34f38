"""One client channel per upstream address, with cached raw-bytes method callables."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from typing import Any

import grpc
import grpc.aio

from mesh.server.app import DEFAULT_MAX_MESSAGE_BYTES


class ChannelPool:
    """Channels keyed by address; HTTP/2 multiplexes every call to one upstream on one."""

    def __init__(
        self,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        credentials: Callable[[], grpc.ChannelCredentials] | None = None,
    ) -> None:
        """``credentials`` (mutual TLS to sidecars) is asked for each new channel, so
        channels opened after a certificate rotation present the new certificate."""
        self._credentials = credentials
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # The gateway retries itself, on another endpoint; grpc's own retry would
            # resend to the same one.
            ("grpc.enable_retries", 0),
        ]
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._callables: dict[tuple[str, str, str], Any] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(address, options=self._options)
            else:
                channel = grpc.aio.secure_channel(
                    address, self._credentials(), options=self._options
                )
            self._channels[address] = channel
        return channel

    def method(self, address: str, path: str, kind: str) -> Any:
        """A multicallable with no serializers: bytes in, bytes out, never re-encoded."""
        key = (address, path, kind)
        found = self._callables.get(key)
        if found is None:
            channel = self.channel(address)
            factory = {
                "unary_unary": channel.unary_unary,
                "unary_stream": channel.unary_stream,
                "stream_unary": channel.stream_unary,
                "stream_stream": channel.stream_stream,
            }[kind]
            found = self._callables[key] = factory(path)
        return found

    def retain(self, addresses: Collection[str]) -> None:
        """Closes channels to addresses that left, in the background with a grace period
        so calls still on them can finish."""
        for address in [a for a in self._channels if a not in addresses]:
            channel = self._channels.pop(address)
            self._callables = {k: v for k, v in self._callables.items() if k[0] != address}
            task = asyncio.get_running_loop().create_task(channel.close(grace=5.0))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for task in list(self._closing):
            task.cancel()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._callables.clear()
