"""OpenTelemetry export: the SDK, set up from the standard environment variables, once a process.

The instrumentation (`pools.engine.telemetry`, `agents.pipeline`) uses only the OpenTelemetry
API, so until `setup()` installs the SDK's providers its spans and instruments are the API's no-ops.
`setup()` installs them when a standard variable names a destination, and does nothing else:

- OTLP over HTTP/protobuf, to any collector or vendor: OTEL_EXPORTER_OTLP_ENDPOINT (a base
  URL; `/v1/traces` and `/v1/metrics` are appended), or per signal
  OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_METRICS_ENDPOINT (full URLs). The
  exporter reads the rest of the family itself (OTEL_EXPORTER_OTLP_HEADERS, _TIMEOUT,
  _COMPRESSION, _CERTIFICATE, and their per-signal forms).
- Azure Monitor (Application Insights): APPLICATIONINSIGHTS_CONNECTION_STRING, through
  Microsoft's OpenTelemetry exporter (azure-monitor-opentelemetry-exporter).

Both may be set at once. OTEL_SDK_DISABLED=true turns everything off, OTEL_TRACES_EXPORTER=none
or OTEL_METRICS_EXPORTER=none one signal. OTEL_SERVICE_NAME (default "carlos") and
OTEL_RESOURCE_ATTRIBUTES describe the service; service.instance.id is the name the pool
snapshots and the cluster view give this process.

Export never slows or fails a design. An ended span is put in a bounded queue per destination
(OTEL_BSP_MAX_QUEUE_SIZE, default 2048) and a background thread exports the queue in batches
(OTEL_BSP_SCHEDULE_DELAY, OTEL_BSP_MAX_EXPORT_BATCH_SIZE); each request gives up after the
exporter's timeout (OTEL_EXPORTER_OTLP_TIMEOUT, default 10 s). While a destination is slow or
down its queue fills, and then new spans are dropped, and counted, never waited for (the SDK's
`BatchSpanProcessor` alone drops them with a log line, uncounted). Metrics are aggregated in
memory, a fixed amount, and exported every OTEL_METRIC_EXPORT_INTERVAL ms (default 60000) by
a thread of their own.
`shutdown()` sends what is still queued, for at most SHUTDOWN_SECONDS, then lets it go.

`describe()` says, for operators (/health's details, `manage.py pool_status`), whether
telemetry is on and where each signal goes: the OTLP URLs (never their headers), the Azure
ingestion endpoint and the instrumentation key masked (never the key), and the span counts.
`TraceContextFilter` puts the current trace and span id on log lines (carlos.settings.LOGGING).

Django-free: it reads the environment, not settings, so any process can call it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

logger = logging.getLogger("carlos.telemetry")

DEFAULT_SERVICE_NAME = "carlos"
# The SDK's own defaults, named here because describe() shows them.
DEFAULT_MAX_QUEUE_SIZE = 2048  # spans waiting per destination; past it new ones are dropped
DEFAULT_SCHEDULE_DELAY_MS = 5000
DEFAULT_MAX_EXPORT_BATCH_SIZE = 512
DEFAULT_METRIC_EXPORT_INTERVAL_MS = 60000
# How long shutdown() waits for the last export; a destination that is down costs no more.
SHUTDOWN_SECONDS = 5.0
DEFAULT_AZURE_INGESTION = "https://dc.services.visualstudio.com"
AZURE_TRACK_PATH = "/v2.1/track"

OTLP = "otlp"
AZURE_MONITOR = "azure_monitor"
NO_DESTINATION = (
    "no destination: set OTEL_EXPORTER_OTLP_ENDPOINT (OTLP over HTTP) or "
    "APPLICATIONINSIGHTS_CONNECTION_STRING (Azure Monitor)"
)


# -- what the environment asks for -------------------------------------------------------------
@dataclass(frozen=True)
class AzureTarget:
    """Where Azure Monitor telemetry goes; `repr` and `describe` never show the key."""

    connection_string: str = field(repr=False)
    ingestion_endpoint: str
    instrumentation_key: str = field(repr=False)

    @property
    def track_url(self) -> str:
        return self.ingestion_endpoint.rstrip("/") + AZURE_TRACK_PATH

    def describe(self) -> dict[str, str]:
        return {
            "ingestion_endpoint": public_url(self.ingestion_endpoint),
            "instrumentation_key": mask(self.instrumentation_key),
        }


@dataclass(frozen=True)
class Plan:
    """What the environment asks for, before anything is built (pure: tests read it)."""

    enabled: bool
    reason: str = ""  # why it is off
    service_name: str = DEFAULT_SERVICE_NAME
    traces: bool = False
    metrics: bool = False
    otlp_traces_url: str | None = None
    otlp_metrics_url: str | None = None
    azure: AzureTarget | None = None
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE
    schedule_delay_ms: float = DEFAULT_SCHEDULE_DELAY_MS
    max_export_batch_size: int = DEFAULT_MAX_EXPORT_BATCH_SIZE
    metric_interval_ms: float = DEFAULT_METRIC_EXPORT_INTERVAL_MS


def plan(environ: Mapping[str, str] | None = None) -> Plan:
    """Read the standard variables: which signals go where, and the queue's bounds."""
    env = os.environ if environ is None else environ
    if _true(env.get("OTEL_SDK_DISABLED")):
        return Plan(enabled=False, reason="OTEL_SDK_DISABLED is true")
    base = (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "").strip()
    traces_url = (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or "").strip() or (
        f"{base.removesuffix('/')}/v1/traces" if base else None
    )
    metrics_url = (env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or "").strip() or (
        f"{base.removesuffix('/')}/v1/metrics" if base else None
    )
    connection_string = (env.get("APPLICATIONINSIGHTS_CONNECTION_STRING") or "").strip()
    azure = parse_connection_string(connection_string) if connection_string else None
    traces = (env.get("OTEL_TRACES_EXPORTER") or "").strip().lower() != "none"
    metrics = (env.get("OTEL_METRICS_EXPORTER") or "").strip().lower() != "none"
    if not traces:
        traces_url = None
    if not metrics:
        metrics_url = None
    has_destination = bool(traces_url or metrics_url or (azure and (traces or metrics)))
    protocol = (env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip().lower()
    if (traces_url or metrics_url) and protocol != "http/protobuf":
        logger.warning(
            "OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported; Carlos sends OTLP over HTTP "
            "(http/protobuf), usually port 4318",
            protocol,
        )
    return Plan(
        enabled=has_destination,
        reason="" if has_destination else NO_DESTINATION,
        service_name=service_name(env),
        traces=traces and bool(traces_url or azure),
        metrics=metrics and bool(metrics_url or azure),
        otlp_traces_url=traces_url,
        otlp_metrics_url=metrics_url,
        azure=azure,
        max_queue_size=_positive_int(env, "OTEL_BSP_MAX_QUEUE_SIZE", DEFAULT_MAX_QUEUE_SIZE),
        schedule_delay_ms=_positive_int(env, "OTEL_BSP_SCHEDULE_DELAY", DEFAULT_SCHEDULE_DELAY_MS),
        max_export_batch_size=_positive_int(
            env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", DEFAULT_MAX_EXPORT_BATCH_SIZE
        ),
        metric_interval_ms=_positive_int(
            env, "OTEL_METRIC_EXPORT_INTERVAL", DEFAULT_METRIC_EXPORT_INTERVAL_MS
        ),
    )


def service_name(env: Mapping[str, str]) -> str:
    """OTEL_SERVICE_NAME, else service.name in OTEL_RESOURCE_ATTRIBUTES, else "carlos"."""
    name = (env.get("OTEL_SERVICE_NAME") or "").strip()
    return name or resource_attributes(env).get("service.name") or DEFAULT_SERVICE_NAME


def resource_attributes(env: Mapping[str, str]) -> dict[str, str]:
    """OTEL_RESOURCE_ATTRIBUTES ("key=value,key=value") as a dict."""
    attributes = {}
    for pair in (env.get("OTEL_RESOURCE_ATTRIBUTES") or "").split(","):
        key, sep, value = pair.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = value.strip()
    return attributes


def parse_connection_string(connection_string: str) -> AzureTarget:
    """The parts of an Application Insights connection string Carlos shows (masked) and uses."""
    parts: dict[str, str] = {}
    for pair in connection_string.split(";"):
        key, sep, value = pair.partition("=")
        if sep:
            parts[key.strip().lower()] = value.strip()
    endpoint = parts.get("ingestionendpoint")
    if not endpoint and parts.get("endpointsuffix"):
        location = f"{parts['location']}." if parts.get("location") else ""
        endpoint = f"https://{location}dc.{parts['endpointsuffix']}"
    return AzureTarget(
        connection_string=connection_string,
        ingestion_endpoint=endpoint or DEFAULT_AZURE_INGESTION,
        instrumentation_key=parts.get("instrumentationkey", ""),
    )


def mask(secret: str) -> str:
    """`4f1c****7a13`: enough to tell two keys apart, never the key (short ones fully masked)."""
    if len(secret) < 16:
        return "****" if secret else ""
    return f"{secret[:4]}****{secret[-4:]}"


def public_url(url: str) -> str:
    """A URL without user info, query or fragment, which may carry credentials."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = int(float(raw))
    except ValueError:
        value = 0
    if value <= 0:
        logger.warning("%s=%r is not a positive number; using %s", name, raw, default)
        return default
    return value


# -- spans: a bounded queue per destination, what is dropped counted ---------------------------
class SpanCounts:
    """What became of the spans handed to one destination (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queued = 0  # admitted to the queue
        self.handed = 0  # taken from the queue by the exporter
        self.exported = 0
        self.failed = 0  # in batches the destination did not accept (error, timeout, refusal)
        self.dropped = 0  # never queued: the queue was full, or export had shut down

    def as_dict(self) -> dict[str, int]:
        with self.lock:
            return {
                "exported": self.exported,
                "failed": self.failed,
                "dropped": self.dropped,
                # in the queue, or in an export not yet answered
                "waiting": self.queued - self.exported - self.failed,
            }


class CountingExporter(SpanExporter):
    """Counts what the destination accepted and refused; a failure is a result, not an
    exception on the export thread."""

    def __init__(self, inner: SpanExporter, counts: SpanCounts) -> None:
        self.inner = inner
        self.counts = counts
        self._last_warning = 0.0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self.counts.lock:
            self.counts.handed += len(spans)
        try:
            result = self.inner.export(spans)
        except Exception as exc:
            result = SpanExportResult.FAILURE
            now = time.monotonic()
            if now - self._last_warning > 60:  # at most a line a minute
                self._last_warning = now
                logger.warning("span export failed: %s: %s", type(exc).__name__, exc, exc_info=True)
        with self.counts.lock:
            if result is SpanExportResult.SUCCESS:
                self.counts.exported += len(spans)
            else:
                self.counts.failed += len(spans)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class BoundedSpanProcessor(SpanProcessor):
    """The SDK's BatchSpanProcessor behind an admission check, so what it drops is counted.

    At most `max_queue_size` spans wait for this destination (queued, or taken by the exporter
    and not yet sent); a span that ends while that many wait is dropped and counted here, in
    the thread that ends it, for the price of a lock and two integers. The batch processor's
    own queue, of the same size, so never fills (it would drop with a log line, uncounted).
    """

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
        schedule_delay_millis: float = DEFAULT_SCHEDULE_DELAY_MS,
        max_export_batch_size: int = DEFAULT_MAX_EXPORT_BATCH_SIZE,
    ) -> None:
        self.counts = SpanCounts()
        self.max_queue_size = max_queue_size
        self._closed = False
        self._batch = BatchSpanProcessor(
            CountingExporter(exporter, self.counts),
            max_queue_size=max_queue_size,
            schedule_delay_millis=schedule_delay_millis,
            max_export_batch_size=min(max_export_batch_size, max_queue_size),
        )

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if not (span.context and span.context.trace_flags.sampled):
            return
        counts = self.counts
        with counts.lock:
            if self._closed or counts.queued - counts.handed >= self.max_queue_size:
                counts.dropped += 1
                return
            counts.queued += 1
        self._batch.on_end(span)

    def shutdown(self) -> None:
        with self.counts.lock:
            self._closed = True
        self._batch.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._batch.force_flush(timeout_millis)


# -- the SDK, built ----------------------------------------------------------------------------
@dataclass
class Telemetry:
    """The SDK providers built from a plan, and the span processor of each destination."""

    plan: Plan
    instance: str
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    span_processors: dict[str, BoundedSpanProcessor] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    installed: bool = False
    shut_down: bool = False

    def shutdown(self, timeout: float = SHUTDOWN_SECONDS) -> bool:
        """Export what is queued and stop, for at most `timeout` seconds; True when done.

        The SDK's own shutdown may wait up to 30 s per provider for a destination that does
        not answer, so it runs in daemon threads that are let go after the deadline.
        """
        if self.shut_down:
            return True
        self.shut_down = True
        threads = [
            threading.Thread(target=_quietly, args=(provider.shutdown,), daemon=True)
            for provider in (self.tracer_provider, self.meter_provider)
            if provider is not None
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        done = not any(thread.is_alive() for thread in threads)
        if not done:
            waiting = sum(p.counts.as_dict()["waiting"] for p in self.span_processors.values())
            logger.warning(
                "telemetry: export did not finish within %.0f s; %d span(s) not sent",
                timeout,
                waiting,
            )
        return done

    def describe(self) -> dict[str, Any]:
        """For operators: on or off, where each signal goes, what became of the spans."""
        plan = self.plan
        body: dict[str, Any] = {
            "enabled": True,
            "service_name": plan.service_name,
            "service_instance_id": self.instance,
        }
        traces: dict[str, Any] = {}
        metrics: dict[str, Any] = {}
        exporting_metrics = self.meter_provider is not None
        if OTLP in self.span_processors:
            traces[OTLP] = public_url(plan.otlp_traces_url or "")
        if exporting_metrics and plan.otlp_metrics_url:
            metrics[OTLP] = public_url(plan.otlp_metrics_url)
        if plan.azure is not None and AZURE_MONITOR not in self.errors:
            body[AZURE_MONITOR] = plan.azure.describe()
            url = public_url(plan.azure.track_url)
            if AZURE_MONITOR in self.span_processors:
                traces[AZURE_MONITOR] = url
            if exporting_metrics and plan.metrics:
                metrics[AZURE_MONITOR] = url
        body["traces"] = traces or "off"
        if metrics:
            metrics["interval_s"] = plan.metric_interval_ms / 1000
        body["metrics"] = metrics or "off"
        if self.span_processors:
            spans = {name: p.counts.as_dict() for name, p in self.span_processors.items()}
            body["spans"] = {"queue_limit": plan.max_queue_size, **spans}
            body["dropped_spans"] = sum(counts["dropped"] for counts in spans.values())
        if self.errors:
            body["errors"] = dict(self.errors)
        if self.shut_down:
            body["shut_down"] = True
        return body


def _quietly(function: Any) -> None:
    try:
        function()
    except Exception:
        logger.exception("telemetry: shutting an exporter down failed")


def default_instance() -> str:
    """How the pools name a process without a cluster (`PoolRegistry.instance`)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def build(environ: Mapping[str, str] | None = None, *, instance: str | None = None) -> Telemetry:
    """The SDK providers the environment asks for, NOT installed as the global ones (tests,
    benchmarks); `setup()` installs them. Off (no providers) when no destination is set.

    A destination whose exporter cannot be built (a malformed connection string) is left
    out, and named in `errors`, so the others still work and the server still starts.
    """
    env = os.environ if environ is None else environ
    the_plan = plan(env)
    telemetry = Telemetry(plan=the_plan, instance=instance or default_instance())
    if not the_plan.enabled:
        return telemetry
    resource = Resource.create(
        {
            **resource_attributes(env),
            "service.name": the_plan.service_name,
            "service.instance.id": resource_attributes(env).get(
                "service.instance.id", telemetry.instance
            ),
            "service.version": _version(),
        }
    )
    tracer_provider = (
        TracerProvider(resource=resource, shutdown_on_exit=False) if the_plan.traces else None
    )
    span_exporters: dict[str, SpanExporter] = {}
    metric_exporters: dict[str, Any] = {}
    if the_plan.otlp_traces_url:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        span_exporters[OTLP] = OTLPSpanExporter(endpoint=the_plan.otlp_traces_url)
    if the_plan.otlp_metrics_url:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        metric_exporters[OTLP] = OTLPMetricExporter(endpoint=the_plan.otlp_metrics_url)
    if the_plan.azure is not None:
        try:
            azure_spans, azure_metrics = _azure_exporters(
                the_plan.azure, tracer_provider, metrics=the_plan.metrics
            )
        except (ValueError, TypeError):
            # Its message may quote the string; say only which part to check.
            telemetry.errors[AZURE_MONITOR] = (
                "APPLICATIONINSIGHTS_CONNECTION_STRING is invalid (it needs "
                "InstrumentationKey=<a GUID>, and IngestionEndpoint=<URL> outside the public "
                "cloud); Azure Monitor export is off"
            )
            logger.error("telemetry: %s", telemetry.errors[AZURE_MONITOR])
        else:
            span_exporters.update(azure_spans)
            metric_exporters.update(azure_metrics)
    if tracer_provider is not None and span_exporters:
        telemetry.tracer_provider = tracer_provider
        for name, exporter in span_exporters.items():
            processor = BoundedSpanProcessor(
                exporter,
                max_queue_size=the_plan.max_queue_size,
                schedule_delay_millis=the_plan.schedule_delay_ms,
                max_export_batch_size=the_plan.max_export_batch_size,
            )
            telemetry.span_processors[name] = processor
            tracer_provider.add_span_processor(processor)
    if metric_exporters:
        readers = [
            PeriodicExportingMetricReader(
                exporter, export_interval_millis=the_plan.metric_interval_ms
            )
            for exporter in metric_exporters.values()
        ]
        telemetry.meter_provider = MeterProvider(
            resource=resource, metric_readers=readers, shutdown_on_exit=False
        )
    return telemetry


def _azure_exporters(
    target: AzureTarget, tracer_provider: TracerProvider | None, *, metrics: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Microsoft's exporters for the connection string: spans when a tracer provider is given
    (it reads the service's resource from it), metrics when asked."""
    from azure.monitor.opentelemetry.exporter import (
        AzureMonitorMetricExporter,
        AzureMonitorTraceExporter,
    )

    spans: dict[str, Any] = {}
    measures: dict[str, Any] = {}
    if tracer_provider is not None:
        spans[AZURE_MONITOR] = AzureMonitorTraceExporter(
            connection_string=target.connection_string, tracer_provider=tracer_provider
        )
    if metrics:
        measures[AZURE_MONITOR] = AzureMonitorMetricExporter(
            connection_string=target.connection_string
        )
    return spans, measures


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("carlos")
    except PackageNotFoundError:
        return "unknown"


# -- the process's telemetry -------------------------------------------------------------------
_lock = threading.Lock()
_current: Telemetry | None = None


def setup(*, instance: str | None = None) -> Telemetry:
    """Install the SDK's providers as the process's global ones, if the environment names a
    destination. Idempotent: the first call decides, later ones return the same (the
    OpenTelemetry API allows one global provider per process). Returns what was set up."""
    global _current
    with _lock:
        if _current is not None:
            return _current
        telemetry = build(instance=instance)
        if telemetry.tracer_provider is not None or telemetry.meter_provider is not None:
            _install(telemetry)
        _current = telemetry
    if telemetry.installed:
        where = telemetry.describe()
        logger.info(
            "📡 Telemetry on (service %s): traces to %s; metrics to %s",
            telemetry.plan.service_name,
            _destinations(where["traces"]),
            _destinations(where["metrics"]),
        )
    return telemetry


def _destinations(where: Any) -> str:
    if not isinstance(where, dict):
        return "nowhere"
    names = {OTLP: "OTLP", AZURE_MONITOR: "Azure Monitor"}
    return ", ".join(f"{names[name]} {url}" for name, url in where.items() if name in names)


def _install(telemetry: Telemetry) -> None:
    """Make the providers the global ones. The API allows that once a process: a provider set
    before (a test's in-memory one, `opentelemetry-instrument`) stays, and is named here."""
    tracing = (telemetry.tracer_provider, trace.set_tracer_provider, trace.get_tracer_provider)
    metering = (telemetry.meter_provider, metrics.set_meter_provider, metrics.get_meter_provider)
    for signal, kind, (provider, set_global, get_global) in (
        ("traces", "tracer", tracing),
        ("metrics", "meter", metering),
    ):
        if provider is None:
            continue
        set_global(provider)
        if get_global() is provider:
            telemetry.installed = True
        else:
            telemetry.errors[signal] = f"another {kind} provider was set in this process first"
    # What could not be installed would only export from threads nothing feeds: stop it.
    if "traces" in telemetry.errors and telemetry.tracer_provider is not None:
        telemetry.tracer_provider.shutdown()
        telemetry.tracer_provider = None
        telemetry.span_processors.clear()
    if "metrics" in telemetry.errors and telemetry.meter_provider is not None:
        telemetry.meter_provider.shutdown(timeout_millis=1000)
        telemetry.meter_provider = None
    for problem in ("traces", "metrics"):
        if problem in telemetry.errors:
            logger.warning("telemetry: %s; Carlos's export is not used", telemetry.errors[problem])


def current() -> Telemetry | None:
    """What `setup()` set up in this process, or None before it was called."""
    return _current


def shutdown(timeout: float = SHUTDOWN_SECONDS) -> bool:
    """Flush and stop the process's exporters (bounded by `timeout`); safe to call always."""
    telemetry = _current
    if telemetry is None or not telemetry.installed:
        return True
    return telemetry.shutdown(timeout)


def describe() -> dict[str, Any]:
    """The operators' view of the process's telemetry (/health, `manage.py pool_status`)."""
    telemetry = _current
    if telemetry is None:
        the_plan = plan()
        reason = the_plan.reason or "not set up in this process"
        return {"enabled": False, "reason": reason}
    if not telemetry.installed:
        body: dict[str, Any] = {"enabled": False, "reason": telemetry.plan.reason}
        if not telemetry.plan.reason:
            body["reason"] = "; ".join(telemetry.errors.values()) or "no exporter could be built"
        return body
    return telemetry.describe()


# -- log lines ---------------------------------------------------------------------------------
class TraceContextFilter(logging.Filter):
    """Adds `trace_context` to each record: ` [trace=<32 hex> span=<16 hex>]` while a span is
    current in the thread or task that logs, else "" (LOGGING's format ends with it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_context = f" [trace={context.trace_id:032x} span={context.span_id:016x}]"
        else:
            record.trace_context = ""
        return True
