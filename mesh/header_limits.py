"""The header-list sizes every hop agrees on, so that a call one hop accepts the next accepts.

Sizes count as HTTP/2's SETTINGS_MAX_HEADER_LIST_SIZE does (RFC 9113 §6.5.2: name + value
+ 32 per field), which is also how grpc-core sizes metadata. Each hop adds a few headers
to what it forwards, so each hop behind another accepts a little more than the one before:
the client's limit is the edge's, and no call the edge accepted is refused further in.
"""

from __future__ import annotations

#: The largest request header list a client may send: what the gateway's ingress and a
#: sidecar's outbound (a worker's own calls) accept and advertise. Envoy's default is 60
#: KiB (``max_request_headers_kb``); gRPC's own default is 8 KiB soft, 16 KiB hard.
MAX_HEADER_LIST = 1 << 16

#: What one hop may add to a request it forwards (request id, trace context, the caller's
#: identity, the sidecar's secret): a few hundred bytes; a route's ``headers.request``
#: edits come out of it too.
HOP_ALLOWANCE = 1 << 12

#: What a sidecar's inbound accepts: a relay's forward of an edge-sized list.
INBOUND_HEADER_LIST = MAX_HEADER_LIST + HOP_ALLOWANCE

#: What a worker accepts (its h2 front and its gRPC server), behind its sidecar's inbound.
#: grpc-core answers RESOURCE_EXHAUSTED above its 8 KiB soft (some calls) and 16 KiB hard
#: (all) defaults: a call with a 20 KiB header that the gateway accepted failed at the
#: worker. Soft and hard are set alike: a limit that refuses a random share of calls is
#: no contract.
MAX_SERVER_METADATA = INBOUND_HEADER_LIST + HOP_ALLOWANCE
