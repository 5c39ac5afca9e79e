"""aiohttp connector that checks the peer's SPIFFE ID right after each TLS handshake,
before any request is sent (hostname checks do not apply to SPIFFE IDs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp

from meshid.errors import UnauthenticatedError
from meshid.spiffe_id import SpiffeId
from meshid.tls import check_server_id


class SpiffeConnector(aiohttp.TCPConnector):
    def __init__(
        self,
        expected: SpiffeId,
        error: Callable[[str], Exception] = aiohttp.ClientConnectionError,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._expected = expected
        self._error = error

    # aiohttp's own (private) signature, hence the `timeout` parameter.
    async def _create_direct_connection(
        self,
        req: Any,
        traces: Any,
        timeout: Any,  # noqa: ASYNC109 - aiohttp's own signature
        **kwargs: Any,
    ) -> Any:
        transport, proto = await super()._create_direct_connection(req, traces, timeout, **kwargs)
        try:
            check_server_id(transport.get_extra_info("ssl_object"), self._expected)
        except UnauthenticatedError as exc:
            transport.close()
            raise self._error(f"peer identity check failed: {exc}") from None
        return transport, proto
