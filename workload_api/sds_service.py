"""grpclib service mapping for Envoy SDS v3 (``envoy.service.secret.v3.SecretDiscoveryService``).

The messages come from the ``xds-protos`` package, which ships only grpcio stubs; this
module is the grpclib equivalent of what ``--grpclib_python_out`` generates (compare
``workload_api/_gen/workload_grpc.py``). Subclass :class:`SecretDiscoveryServiceBase`
and hand the instance to ``grpclib.server.Server``. ``DeltaSecrets`` answers
``UNIMPLEMENTED`` unless a subclass overrides it.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

import grpclib.client
import grpclib.const
from envoy.service.discovery.v3 import discovery_pb2

# Imported for its side effect: registers the service (and the Secret message types
# that DiscoveryResponse.resources carry) in the default descriptor pool.
from envoy.service.secret.v3 import sds_pb2  # noqa: F401
from grpclib.exceptions import GRPCError

if TYPE_CHECKING:
    import grpclib.server

SERVICE_NAME = "envoy.service.secret.v3.SecretDiscoveryService"
STREAM_SECRETS = f"/{SERVICE_NAME}/StreamSecrets"
FETCH_SECRETS = f"/{SERVICE_NAME}/FetchSecrets"
DELTA_SECRETS = f"/{SERVICE_NAME}/DeltaSecrets"

DiscoveryRequest = discovery_pb2.DiscoveryRequest
DiscoveryResponse = discovery_pb2.DiscoveryResponse
DeltaDiscoveryRequest = discovery_pb2.DeltaDiscoveryRequest
DeltaDiscoveryResponse = discovery_pb2.DeltaDiscoveryResponse


class SecretDiscoveryServiceBase(abc.ABC):
    """Server side of SDS; the handlers receive a ``grpclib.server.Stream``."""

    @abc.abstractmethod
    async def StreamSecrets(
        self, stream: grpclib.server.Stream[discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse]
    ) -> None:
        """Bidirectional stream (state-of-the-world xDS)."""

    @abc.abstractmethod
    async def FetchSecrets(
        self, stream: grpclib.server.Stream[discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse]
    ) -> None:
        """Unary fetch."""

    async def DeltaSecrets(
        self,
        stream: grpclib.server.Stream[
            discovery_pb2.DeltaDiscoveryRequest, discovery_pb2.DeltaDiscoveryResponse
        ],
    ) -> None:
        """Incremental xDS: not supported (SPEC-PROTOCOLS.md §4)."""
        raise GRPCError(grpclib.const.Status.UNIMPLEMENTED, "DeltaSecrets is not implemented")

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {
            STREAM_SECRETS: grpclib.const.Handler(
                self.StreamSecrets,
                grpclib.const.Cardinality.STREAM_STREAM,
                DiscoveryRequest,
                DiscoveryResponse,
            ),
            FETCH_SECRETS: grpclib.const.Handler(
                self.FetchSecrets,
                grpclib.const.Cardinality.UNARY_UNARY,
                DiscoveryRequest,
                DiscoveryResponse,
            ),
            DELTA_SECRETS: grpclib.const.Handler(
                self.DeltaSecrets,
                grpclib.const.Cardinality.STREAM_STREAM,
                DeltaDiscoveryRequest,
                DeltaDiscoveryResponse,
            ),
        }


class SecretDiscoveryServiceStub:
    """grpclib client for SDS (used by tests; Envoy is the real client)."""

    def __init__(self, channel: grpclib.client.Channel) -> None:
        self.StreamSecrets = grpclib.client.StreamStreamMethod(
            channel, STREAM_SECRETS, DiscoveryRequest, DiscoveryResponse
        )
        self.FetchSecrets = grpclib.client.UnaryUnaryMethod(
            channel, FETCH_SECRETS, DiscoveryRequest, DiscoveryResponse
        )
        self.DeltaSecrets = grpclib.client.StreamStreamMethod(
            channel, DELTA_SECRETS, DeltaDiscoveryRequest, DeltaDiscoveryResponse
        )
