"""The header-list sizes every hop agrees on, so that a call one hop accepts the next accepts.

Sizes count as HTTP/2's SETTINGS_MAX_HEADER_LIST_SIZE does (RFC 9113 §6.5.2: name + value
+ 32 per field), which is also how grpc-core sizes metadata.
"""

from __future__ import annotations

#: The largest request header list the relay accepts and advertises, at every hop (gateway
#: ingress, sidecar inbound and outbound, a worker's h2 front). Envoy's default is 60 KiB
#: (``max_request_headers_kb``); gRPC's own default is 8 KiB soft, 16 KiB hard.
MAX_HEADER_LIST = 1 << 16

#: What the hops may add to a request on its way (request id, trace context, forwarded
#: client address, the sidecar's secret, a route's ``headers.request`` edits).
HOP_ALLOWANCE = 1 << 13

#: The metadata a gRPC server behind the relay accepts. grpc-core answers
#: RESOURCE_EXHAUSTED above its 8 KiB soft (some calls) and 16 KiB hard (all) limits: a
#: call with a 20 KiB header that the gateway accepted failed at the worker. Soft and
#: hard are set alike: a limit that refuses a random share of calls is no contract.
MAX_SERVER_METADATA = MAX_HEADER_LIST + HOP_ALLOWANCE
