"""The pipe protocol between the server and its relay process (issuer.events.relay_process
and issuer.events.relay_worker). Both ends live in this repository and run the same code,
so the protocol carries no version.

Server -> relay process, on the child's stdin:
- first line: the `WorkerSpec` as one JSON object (secrets travel here, never in argv or
  the environment, which other local users can read);
- then a bare b"\\n" per wake-up, or a JSON object line with settings to change;
- EOF: shut down (also what the child sees when the server dies, however it died).

Relay process -> server, one JSON object per line on the child's stdout, `kind` being:
- "wake": a wake-up was handed to the relay (the server may send the next one);
- "status": the relay's status() and the telemetry recorded since the last report;
- "log": a log record, re-emitted by the server under the same logger name.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from issuer.events.relay import KafkaConfig
from meshid.telemetry import Telemetry

WAKE = b"\n"

# The instruments OutboxRelay touches, by the attribute name they have on Telemetry.
COUNTERS = ("events_published", "kafka_errors")
GAUGES = ("kafka_up", "outbox_backlog", "outbox_oldest_age")
HISTOGRAMS = ("relay_lag",)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything the relay process needs, sent as the first line on its stdin."""

    datastore: str  # an absolute SQLite path or a PostgreSQL DSN
    kafka: KafkaConfig
    source: str
    owner: str
    retention: float | None = None
    poll_interval: float = 0.5
    nice: int = 0  # added to the child's niceness
    log_level: int = logging.WARNING

    def to_line(self) -> bytes:
        body = dataclasses.asdict(self)
        return json.dumps(body, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> WorkerSpec:
        body = json.loads(line)
        kafka = dict(body.pop("kafka"))
        servers = kafka["bootstrap_servers"]
        kafka["bootstrap_servers"] = servers if isinstance(servers, str) else tuple(servers)
        return cls(kafka=KafkaConfig(**kafka), **body)


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), default=str).encode() + b"\n"


# --- telemetry: recorded in the relay process, replayed on the server's Telemetry --------------


class _Counter:
    def __init__(self, sink: RecordingTelemetry, name: str) -> None:
        self._sink, self._name = sink, name

    def add(self, amount: int | float, attributes: dict[str, str] | None = None) -> None:
        key = (self._name, tuple(sorted((attributes or {}).items())))
        self._sink.counts[key] += amount


class _Gauge:
    def __init__(self, sink: RecordingTelemetry, name: str) -> None:
        self._sink, self._name = sink, name

    def set(self, amount: int | float, attributes: dict[str, str] | None = None) -> None:
        if self._sink.shipped_gauges.get(self._name) == amount:
            self._sink.gauges.pop(self._name, None)
        else:
            self._sink.gauges[self._name] = amount


class _Histogram:
    def __init__(self, sink: RecordingTelemetry, name: str) -> None:
        self._sink, self._name = sink, name

    def record(self, value: float, n: int = 1) -> None:
        self._sink.observations[(self._name, value)] += n


class RecordingTelemetry:
    """Stands in for Telemetry in the relay process: records what OutboxRelay does to its
    instruments, and `drain()` hands it over as one JSON-able report (None if nothing)."""

    def __init__(self) -> None:
        self.counts: defaultdict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self.gauges: dict[str, float] = {}
        self.shipped_gauges: dict[str, float] = {}  # a gauge set to its shipped value is no news
        self.observations: defaultdict[tuple[str, float], int] = defaultdict(int)
        for name in COUNTERS:
            setattr(self, name, _Counter(self, name))
        for name in GAUGES:
            setattr(self, name, _Gauge(self, name))
        for name in HISTOGRAMS:
            setattr(self, name, _Histogram(self, name))

    def drain(self) -> dict[str, Any] | None:
        if not (self.counts or self.gauges or self.observations):
            return None
        report = {
            "add": [[name, dict(attrs), n] for (name, attrs), n in self.counts.items()],
            "set": self.gauges,
            "record": [[name, value, n] for (name, value), n in self.observations.items()],
        }
        self.shipped_gauges.update(self.gauges)
        self.counts = defaultdict(float)
        self.gauges = {}
        self.observations = defaultdict(int)
        return report


def replay(telemetry: Telemetry, report: dict[str, Any]) -> None:
    """Apply a relay process's telemetry report to the server's own instruments."""
    for name, attrs, n in report.get("add", ()):
        if name in COUNTERS:
            getattr(telemetry, name).add(_number(n), attrs)
    for name, value in report.get("set", {}).items():
        if name in GAUGES:
            getattr(telemetry, name).set(_number(value))
    for name, value, n in report.get("record", ()):
        if name in HISTOGRAMS:
            getattr(telemetry, name).record(value, n)


def _number(value: float) -> int | float:
    # Counts travel as JSON numbers; keep integers integral so /metrics prints "300", not "300.0".
    return int(value) if float(value).is_integer() else value


# --- log records --------------------------------------------------------------------------------

_RECORD_FIELDS = ("name", "levelno", "levelname", "created", "msecs", "pathname", "filename", "module",
                  "lineno", "funcName", "process", "processName", "threadName")


def record_to_wire(record: logging.LogRecord, max_chars: int) -> dict[str, Any]:
    """A log record as data: the message already formatted (its args may not be JSON-able),
    the traceback as text."""
    out = {f: getattr(record, f, None) for f in _RECORD_FIELDS}
    message = record.getMessage()
    if len(message) > max_chars:
        message = message[:max_chars] + f"... [{len(message) - max_chars} characters cut]"
    out["msg"] = message
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    out["exc_text"] = record.exc_text
    return out


def record_from_wire(data: dict[str, Any]) -> logging.LogRecord:
    fields = {k: v for k, v in data.items() if k in (*_RECORD_FIELDS, "msg", "exc_text")}
    return logging.makeLogRecord(fields | {"args": None})
