"""Metrics (OpenTelemetry SDK, exposed as Prometheus text) and optional tracing.

Metrics go through the OpenTelemetry SDK with an in-memory reader; `/metrics` renders
the collected data in the Prometheus text format (0.0.4). That is a page of code, so we
do not depend on `opentelemetry-exporter-prometheus` (a pre-release that also pulls in
`prometheus_client` and its global registry).

Tracing is off unless `configure_tracing` is called: until then spans are no-ops.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    NumberDataPoint,
    Sum,
)
from opentelemetry.sdk.resources import Resource

from meshid import __version__
from meshid.errors import ConfigError

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds; signing is sub-millisecond to tens of ms, relay lag ms to hours (outages).
SIGNING_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
               3600.0)

_UNIT_SUFFIX = {"s": "_seconds", "ms": "_milliseconds", "By": "_bytes"}


class Telemetry:
    """All of meshid's instruments on one private MeterProvider (the global OpenTelemetry
    provider is left alone, so embedding applications keep theirs)."""

    def __init__(self, service_name: str = "meshid") -> None:
        self._reader = InMemoryMetricReader()
        self._provider = MeterProvider(
            metric_readers=[self._reader],
            resource=Resource.create({"service.name": service_name, "service.version": __version__}),
        )
        # collect() on the in-memory reader is not re-entrant across threads.
        self._collect_lock = threading.Lock()
        m = self._provider.get_meter("meshid", __version__)
        self.svid_issued = m.create_counter(
            "meshid.svid.issued", unit="1", description="SVIDs signed, by kind (x509, jwt) and reason")
        self.svid_refused = m.create_counter(
            "meshid.svid.refused", unit="1", description="signing requests refused, by kind and reason")
        self.signing_duration = m.create_histogram(
            "meshid.svid.signing.duration", unit="s", description="time to sign one batch of CSRs",
            explicit_bucket_boundaries_advisory=SIGNING_BUCKETS)
        self.attestations = m.create_counter(
            "meshid.attestation", unit="1",
            description="attestation outcomes, by kind (node, workload), attestor and outcome")
        self.events_published = m.create_counter(
            "meshid.events.published", unit="1", description="outbox events acknowledged by Kafka")
        self.kafka_errors = m.create_counter(
            "meshid.events.kafka.errors", unit="1", description="Kafka errors seen by the relay, by kind")
        # Recorded per event at the relay's full rate: the SDK's record() costs about as much
        # as publishing the event, so this one takes a count (events sharing one lag).
        self.relay_lag = CountedHistogram(
            "meshid.events.relay.lag", unit="s", description="time from the act to the broker's ack",
            bounds=LAG_BUCKETS)
        self.outbox_backlog = m.create_gauge(
            "meshid.events.outbox.backlog", unit="1", description="outbox rows not yet delivered")
        self.outbox_oldest_age = m.create_gauge(
            "meshid.events.outbox.oldest_age", unit="s", description="age of the oldest undelivered event")
        self.kafka_up = m.create_gauge(
            "meshid.events.kafka.up", unit="1",
            description="1 when the relay is publishing, 0 when it is failing (see /ready for why)")
        self.alerts = m.create_counter(
            "meshid.detector.alerts", unit="1", description="alerts raised by the detector, by rule")
        self.ca_key_destroy_failures = m.create_counter(
            "meshid.ca.key.destroy.failures", unit="1",
            description="retired CA keys the key manager could not destroy (left in the HSM), by key "
                        "manager and kind")

    # --- small helpers so call sites stay one line ----------------------------------------

    def record_issued(self, kind: str, reason: str = "", n: int = 1) -> None:
        self.svid_issued.add(n, {"kind": kind, "reason": reason})

    def record_refused(self, kind: str, reason: str, n: int = 1) -> None:
        self.svid_refused.add(n, {"kind": kind, "reason": reason})

    def record_attestation(self, kind: str, attestor: str, ok: bool, n: int = 1) -> None:
        outcome = "success" if ok else "failure"
        self.attestations.add(n, {"kind": kind, "attestor": attestor, "outcome": outcome})

    # --- exposition -----------------------------------------------------------------------

    def collect(self) -> list[Metric]:
        with self._collect_lock:
            data = self._reader.get_metrics_data()
        own = [h.metric() for h in (self.relay_lag,) if h.count]
        if data is None:
            return own
        return [m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics] + own

    def render_prometheus(self) -> str:
        return render_prometheus(self.collect())

    def shutdown(self) -> None:
        self._provider.shutdown()


class CountedHistogram:
    """An explicit-bucket histogram (OpenTelemetry semantics: bucket i holds values in
    (bounds[i-1], bounds[i]]) whose record() takes a count, exported with the SDK's metrics."""

    def __init__(self, name: str, *, unit: str, description: str, bounds: Sequence[float]) -> None:
        self.name, self.unit, self.description = name, unit, description
        self._bounds = tuple(bounds)
        self._buckets = [0] * (len(self._bounds) + 1)
        self.count = 0
        self._sum = 0.0
        self._min = math.inf
        self._max = -math.inf
        self._start = time.time_ns()
        self._lock = threading.Lock()

    def record(self, value: float, n: int = 1) -> None:
        """`n` observations of `value`."""
        if n <= 0:
            return
        i = bisect.bisect_left(self._bounds, value)
        with self._lock:
            self._buckets[i] += n
            self.count += n
            self._sum += value * n
            self._min = min(self._min, value)
            self._max = max(self._max, value)

    def metric(self) -> Metric:
        with self._lock:
            point = HistogramDataPoint(
                attributes={}, start_time_unix_nano=self._start, time_unix_nano=time.time_ns(),
                count=self.count, sum=self._sum, bucket_counts=list(self._buckets),
                explicit_bounds=list(self._bounds), min=self._min, max=self._max)
        return Metric(self.name, self.description, self.unit,
                      Histogram([point], AggregationTemporality.CUMULATIVE))


_default: Telemetry | None = None
_default_lock = threading.Lock()


def default_telemetry() -> Telemetry:
    """The process-wide instance that components use unless handed their own."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Telemetry()
        return _default


# --- Prometheus text format ------------------------------------------------------------------


def prometheus_name(name: str, unit: str | None) -> str:
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    if base[:1].isdigit():
        base = "_" + base
    suffix = _UNIT_SUFFIX.get(unit or "", "")
    return base if not suffix or base.endswith(suffix) else base + suffix


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(attrs: Mapping[str, Any] | None, extra: Sequence[tuple[str, str]] = ()) -> str:
    pairs = [(prometheus_name(str(k), None), str(v)) for k, v in sorted((attrs or {}).items())]
    pairs += list(extra)
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in pairs) + "}"


def _num(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def render_prometheus(metrics: Sequence[Metric]) -> str:
    lines: list[str] = []
    for metric in metrics:
        name = prometheus_name(metric.name, metric.unit)
        data = metric.data
        if isinstance(data, Sum) and data.is_monotonic:
            kind, sample = "counter", name + "_total"
        elif isinstance(data, Sum | Gauge):
            kind, sample = "gauge", name
        elif isinstance(data, Histogram):
            kind, sample = "histogram", name
        else:  # exponential histograms are not configured anywhere
            continue
        if metric.description:
            lines.append(f"# HELP {name} {_escape_help(metric.description)}")
        lines.append(f"# TYPE {name} {kind}")
        for point in data.data_points:
            if isinstance(point, NumberDataPoint):
                lines.append(f"{sample}{_labels(point.attributes)} {_num(point.value)}")
            elif isinstance(point, HistogramDataPoint):
                cumulative = 0
                for bound, count in zip([*point.explicit_bounds, math.inf], point.bucket_counts, strict=True):
                    cumulative += count
                    lines.append(f"{name}_bucket{_labels(point.attributes, [('le', _num(float(bound)))])} "
                                 f"{cumulative}")
                lines.append(f"{name}_sum{_labels(point.attributes)} {_num(point.sum)}")
                lines.append(f"{name}_count{_labels(point.attributes)} {point.count}")
    return "\n".join(lines) + "\n"


TELEMETRY_KEY: web.AppKey[Telemetry] = web.AppKey("meshid_telemetry", Telemetry)


async def metrics_handler(request: web.Request) -> web.Response:
    """GET /metrics: the app's Telemetry (app[TELEMETRY_KEY]) or the process default."""
    telemetry = request.app.get(TELEMETRY_KEY) or default_telemetry()
    return web.Response(body=telemetry.render_prometheus().encode(),
                        headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})


# --- tracing ----------------------------------------------------------------------------------

_tracer_provider: Any = None  # opentelemetry.sdk.trace.TracerProvider when configured
_tracer: trace.Tracer = trace.NoOpTracer()


def configure_tracing(exporter: str = "none", *, endpoint: str = "", service_name: str = "meshid") -> Any:
    """Turn tracing on: `none` (default, no-op), `console`, `memory` (tests) or `otlp`
    (needs the opentelemetry-exporter-otlp package). Returns the span exporter, if any.

    Uses a private TracerProvider rather than the global one, so it can be reconfigured
    and never fights an embedding application's provider."""
    global _tracer_provider, _tracer
    shutdown_tracing()
    if exporter == "none":
        return None
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

    span_exporter: SpanExporter
    if exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        span_exporter = ConsoleSpanExporter()
    elif exporter == "memory":
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        span_exporter = InMemorySpanExporter()
    elif exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter,
            )
        except ImportError:
            raise ConfigError(
                "tracing.exporter = otlp needs the opentelemetry-exporter-otlp-proto-http package") from None
        span_exporter = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
    else:
        raise ConfigError(f"tracing.exporter: must be none, console, memory or otlp (got {exporter!r})")
    provider = TracerProvider(resource=Resource.create({"service.name": service_name,
                                                         "service.version": __version__}))
    # Memory export is for tests, which want spans visible as soon as they end.
    if exporter == "memory":
        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    else:
        provider.add_span_processor(BatchSpanProcessor(span_exporter))
    _tracer_provider = provider
    _tracer = provider.get_tracer("meshid", __version__)
    return span_exporter


def shutdown_tracing() -> None:
    """Flush and stop the exporter; spans become no-ops again."""
    global _tracer_provider, _tracer
    if _tracer_provider is not None:
        _tracer_provider.shutdown()
    _tracer_provider = None
    _tracer = trace.NoOpTracer()


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[trace.Span]:
    """`with span("sign_batch", agent_id=...):` — a no-op unless tracing is configured."""
    with _tracer.start_as_current_span(name, attributes=attributes or None) as s:
        yield s
