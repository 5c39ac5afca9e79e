"""What one local user may hold open on the Workload API socket: connections and streams per
caller uid, and connections in all. Every local user may connect, so without caps one of them
could take every file descriptor the agent may open (leaving it unable to reach its server or
read /proc for anyone else), or its memory: a stream costs the agent ~17 KB and one
connection may carry 100."""

from __future__ import annotations

import logging
import time

from meshid.token_bucket import KeyedBuckets

log = logging.getLogger("meshid.agent.grpc")

# File descriptors kept out of the Workload API's reach: the agent's own connections to the
# server, /proc reads for attestation, its state files, its other sockets.
FD_RESERVE = 256
_REFUSAL_LOG_INTERVAL = 60.0
_MAX_JWT_BUCKETS = 10_000

Uid = int | None  # None: the peer's credentials could not be read


class _Counter:
    def __init__(self) -> None:
        self.held: dict[Uid, int] = {}
        self.total = 0

    def take(self, uid: Uid) -> None:
        self.held[uid] = self.held.get(uid, 0) + 1
        self.total += 1

    def give_back(self, uid: Uid) -> None:
        left = self.held.get(uid, 0) - 1
        if left > 0:
            self.held[uid] = left
        else:
            self.held.pop(uid, None)
        self.total -= 1


class CallerLimits:
    """Also new JWT-SVIDs per caller uid: each is a signing by the server, charged to this
    agent's signing budget there, the budget that renews every workload's X509-SVIDs."""

    def __init__(self, connections_per_uid: int, streams_per_uid: int, total_connections: int,
                 jwt_rate: float = 10.0, jwt_burst: int = 100) -> None:
        self.connections_per_uid = connections_per_uid
        self.streams_per_uid = streams_per_uid
        self.total_connections = total_connections
        self._jwt: KeyedBuckets[Uid] = KeyedBuckets(jwt_rate, jwt_burst, _MAX_JWT_BUCKETS)
        self.connections = _Counter()
        self.streams = _Counter()
        self.refused = 0
        self._logged: dict[tuple[str, Uid], float] = {}

    def admit_connection(self, uid: Uid) -> bool:
        held = self.connections.held.get(uid, 0)
        if held >= self.connections_per_uid:
            return self._refuse("connections", uid, f"uid {uid} holds {held} Workload API connections "
                                "(max_connections_per_uid); closing its new ones")
        if self.connections.total >= self.total_connections:
            return self._refuse("budget", None, f"{self.connections.total} Workload API connections open "
                                "(the agent's file descriptor budget); closing new ones")
        self.connections.take(uid)
        return True

    def release_connection(self, uid: Uid) -> None:
        self.connections.give_back(uid)

    def stream_refusal(self, uid: Uid) -> str | None:
        """None if uid may open one more stream (then counted), else why not."""
        held = self.streams.held.get(uid, 0)
        if held >= self.streams_per_uid:
            message = f"uid {uid} has {held} Workload API streams open (max_streams_per_uid)"
            self._refuse("streams", uid, message + "; refusing its new ones")
            return message
        self.streams.take(uid)
        return None

    def release_stream(self, uid: Uid) -> None:
        self.streams.give_back(uid)

    def jwt_refusal(self, uid: Uid, new: int) -> str | None:
        """None if uid may have `new` JWT-SVIDs signed now (then charged), else why not."""
        wait = self._jwt.try_take(uid, new)
        if wait == 0:
            return None
        message = (f"uid {uid} asks for new JWT-SVIDs faster than jwt_svid_mint_rate_per_uid "
                   f"({self._jwt.rate:g}/s); retry in {wait:.1f}s")
        self._refuse("jwt", uid, message)
        return message

    def _refuse(self, kind: str, uid: Uid, message: str) -> bool:
        self.refused += 1
        # Once a minute per uid and kind: a caller looping on connect must not fill the log.
        now = time.monotonic()
        key = (kind, uid)
        if now - self._logged.get(key, -_REFUSAL_LOG_INTERVAL) >= _REFUSAL_LOG_INTERVAL:
            if len(self._logged) >= 1024:
                self._logged.clear()
            self._logged[key] = now
            log.warning("%s", message)
        return False
