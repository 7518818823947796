"""Telemetry export with the real exporters to real receivers on loopback (carlos.telemetry).

The receivers are plain HTTP servers in this process: an OTLP/HTTP collector that decodes the
protobuf payloads with the official `opentelemetry-proto` messages, an Application Insights
ingestion endpoint that records the JSON envelopes Microsoft's exporter posts to
`/v2.1/track`, and a collector that accepts connections and never answers. Whole designs run
in child processes (`manage.py design`, `manage.py serve`), as in production: the SDK's global
providers can be installed once a process, so this process never installs them.
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import json
import logging
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import StringIO
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.conf import settings
from google.protobuf.message import Message
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.trace import SpanKind

from carlos import telemetry
from carlos.lifespan import PoolLifespan
from pools.simulator.process import start_simulator
from tests.helpers.waiting import eventually_sync
from tests.servers import child_env, manage, serving, stop

# Distinctive, so that finding it anywhere is a leak (the all-zero GUID would match masks).
INSTRUMENTATION_KEY = "4f1c2a9e-7b3d-4e8a-9c61-2d5f8e0b7a13"
MASKED_KEY = "4f1c****7a13"
# What Microsoft's exporter would otherwise reach on its own: its statsbeat and settings
# services are on the internet; the tests send nothing past loopback.
AZURE_QUIET = {
    "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true",
    "APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED": "true",
    "APPLICATIONINSIGHTS_SDKSTATS_DISABLED": "true",
}
OTEL_VARIABLES = (
    "OTEL_SDK_DISABLED",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_TRACES_EXPORTER",
    "OTEL_METRICS_EXPORTER",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_METRIC_EXPORT_INTERVAL",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
)


def connection_string(port: int) -> str:
    return f"InstrumentationKey={INSTRUMENTATION_KEY};IngestionEndpoint=http://127.0.0.1:{port}/"


# -- receivers ---------------------------------------------------------------------------------
@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes  # decompressed
    at: float  # time.time() when it arrived


@dataclass
class Receiver:
    """An OTLP/HTTP collector and an Application Insights ingestion endpoint in one loopback
    server: it records every POST, answers OTLP with an empty Export*ServiceResponse and
    /v2.1/track as the ingestion service does (all items accepted)."""

    received: list[Received] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def start(self) -> Receiver:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip" or body[:2] == b"\x1f\x8b":
                    body = gzip.decompress(body)
                recorder.received.append(
                    Received(self.path, dict(self.headers.items()), body, time.time())
                )
                if self.path.endswith("/v1/traces"):
                    reply, kind = ExportTraceServiceResponse(), "application/x-protobuf"
                    content = reply.SerializeToString()
                elif self.path.endswith("/v1/metrics"):
                    reply, kind = ExportMetricsServiceResponse(), "application/x-protobuf"
                    content = reply.SerializeToString()
                else:  # Application Insights: /v2.1/track
                    items = len(envelopes_in(body))
                    kind = "application/json"
                    content = json.dumps(
                        {"itemsReceived": items, "itemsAccepted": items, "errors": []}
                    ).encode()
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def traces(self) -> list[ExportTraceServiceRequest]:
        return self._parsed("/v1/traces", ExportTraceServiceRequest)

    def metrics(self) -> list[ExportMetricsServiceRequest]:
        return self._parsed("/v1/metrics", ExportMetricsServiceRequest)

    def _parsed[M: Message](self, path: str, message: type[M]) -> list[M]:
        """The OTLP requests received on `path`, decoded from protobuf."""
        requests = []
        for item in list(self.received):
            if item.path.endswith(path):
                request = message()
                request.ParseFromString(item.body)
                requests.append(request)
        return requests

    def envelopes(self) -> list[dict[str, Any]]:
        return [
            envelope
            for item in list(self.received)
            if item.path.endswith("/track")
            for envelope in envelopes_in(item.body)
        ]

    def wait_for(self, condition: Callable[[], Any], limit: float = 20) -> None:
        """Readiness, not timing: poll until `condition()` holds (fails after `limit` s)."""
        eventually_sync(
            condition,
            limit,
            what="the receiver got what was sent",
            state=lambda: f"receiver got: {[r.path for r in self.received]}",
        )


def envelopes_in(body: bytes) -> list[dict[str, Any]]:
    """Application Insights takes a JSON array, or one envelope per line."""
    text = body.decode()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class SilentCollector:
    """Accepts connections and never answers, as a hung collector or a black-holed network:
    each export waits for its timeout. Records when each connection came."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.connections: list[socket.socket] = []
        self.accepted_at: list[float] = []
        self._stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        while not self._stopping:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(connection)
            self.accepted_at.append(time.time())

    def stop(self) -> None:
        self._stopping = True
        self.listener.close()
        for connection in self.connections:
            connection.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def silent() -> Iterator[SilentCollector]:
    collector = SilentCollector()
    try:
        yield collector
    finally:
        collector.stop()


@pytest.fixture
def clean_env(monkeypatch) -> pytest.MonkeyPatch:
    """No OTEL_* or Application Insights variable from the environment the tests run in."""
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def azure_quiet(clean_env, tmp_path) -> pytest.MonkeyPatch:
    """Microsoft's exporter kept on loopback, its offline-retry files in this test's folder."""
    for name, value in AZURE_QUIET.items():
        clean_env.setenv(name, value)
    clean_env.setattr(tempfile, "tempdir", str(tmp_path))
    return clean_env


# -- spans and attributes as the receivers decode them -----------------------------------------
def value_of(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(item) for item in value.array_value.values]
    return getattr(value, kind) if kind else None


def attributes_of(pairs: Any) -> dict[str, Any]:
    return {pair.key: value_of(pair.value) for pair in pairs}


@dataclass
class ExportedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status_code: int
    scope: str
    resource: dict[str, Any]

    @property
    def ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def spans_in(requests: list[ExportTraceServiceRequest]) -> list[ExportedSpan]:
    spans = []
    for request in requests:
        for resource_spans in request.resource_spans:
            resource = attributes_of(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        ExportedSpan(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            attributes=attributes_of(span.attributes),
                            events=[(e.name, attributes_of(e.attributes)) for e in span.events],
                            status_code=span.status.code,
                            scope=scope_spans.scope.name,
                            resource=resource,
                        )
                    )
    return spans


def metric_names(requests: list[ExportMetricsServiceRequest]) -> set[str]:
    return {
        metric.name
        for request in requests
        for resource_metrics in request.resource_metrics
        for scope_metrics in resource_metrics.scope_metrics
        for metric in scope_metrics.metrics
    }


# -- what the environment asks for -------------------------------------------------------------
def test_off_unless_a_destination_is_set():
    plan = telemetry.plan({})
    assert not plan.enabled and "OTEL_EXPORTER_OTLP_ENDPOINT" in plan.reason
    built = telemetry.build({})
    assert built.tracer_provider is None and built.meter_provider is None
    assert telemetry.plan({"OTEL_SERVICE_NAME": "x"}).enabled is False


def test_the_standard_variables_choose_where_each_signal_goes():
    plan = telemetry.plan({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"})
    assert plan.enabled and plan.traces and plan.metrics
    assert plan.otlp_traces_url == "http://collector:4318/v1/traces"
    assert plan.otlp_metrics_url == "http://collector:4318/v1/metrics"
    assert plan.service_name == "carlos" and plan.azure is None

    plan = telemetry.plan(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://traces.example/api/v1/traces",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_SERVICE_NAME": "carlos-eu",
            "OTEL_BSP_MAX_QUEUE_SIZE": "100",
        }
    )
    assert plan.otlp_traces_url == "https://traces.example/api/v1/traces"
    assert plan.otlp_metrics_url is None and not plan.metrics
    assert (plan.service_name, plan.max_queue_size) == ("carlos-eu", 100)

    plan = telemetry.plan({"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs,team=a"})
    assert plan.service_name == "from-attrs"

    plan = telemetry.plan({"APPLICATIONINSIGHTS_CONNECTION_STRING": connection_string(9)})
    assert plan.enabled and plan.traces and plan.metrics
    assert plan.azure is not None
    assert plan.azure.ingestion_endpoint == "http://127.0.0.1:9/"
    assert INSTRUMENTATION_KEY not in repr(plan)

    disabled = telemetry.plan(
        {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    )
    assert not disabled.enabled and disabled.reason == "OTEL_SDK_DISABLED is true"


def test_the_instrumentation_key_is_masked_and_urls_lose_their_credentials():
    target = telemetry.parse_connection_string(
        f"InstrumentationKey={INSTRUMENTATION_KEY};EndpointSuffix=applicationinsights.azure.cn;"
        "Location=chinaeast2"
    )
    assert target.ingestion_endpoint == "https://chinaeast2.dc.applicationinsights.azure.cn"
    assert target.describe()["instrumentation_key"] == MASKED_KEY
    assert telemetry.mask("short") == "****"
    assert telemetry.public_url("https://user:pw@otlp.example:4318/v1/traces?api_key=s#x") == (
        "https://otlp.example:4318/v1/traces"
    )


# -- the exporters, in this process (providers built, not installed) ---------------------------
def a_design_like_trace(provider: Any) -> tuple[str, str]:
    """design -> stage -> invoke_agent -> chat, the chat span attributed as the engine does;
    returns the trace id and the chat span id."""
    pipeline = provider.get_tracer("carlos.pipeline")
    pools = provider.get_tracer("carlos.pools")
    with (
        pipeline.start_as_current_span("design", attributes={"carlos.design.id": 7}) as root,
        pipeline.start_as_current_span("stage designs", attributes={"carlos.stage": "designs"}),
        pipeline.start_as_current_span(
            "invoke_agent carlos",
            attributes={"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "carlos"},
        ),
        pools.start_as_current_span(
            "chat gpt-4o",
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": "openai",
                "gen_ai.request.model": "gpt-4o",
                "gen_ai.usage.input_tokens": 120,
                "gen_ai.usage.output_tokens": 340,
                "server.address": "127.0.0.1",
                "server.port": 8765,
            },
        ) as chat,
    ):
        chat.add_event("retry", {"carlos.retry.cause": "APIConnectionError"})
    return f"{root.get_span_context().trace_id:032x}", f"{chat.get_span_context().span_id:016x}"


def test_otlp_export_reaches_a_real_collector(clean_env, receiver):
    built = telemetry.build(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_SERVICE_NAME": "carlos-test"},
        instance="host-a:42",
    )
    trace_id, chat_id = a_design_like_trace(built.tracer_provider)
    histogram = built.meter_provider.get_meter("carlos.pools").create_histogram(
        "gen_ai.client.operation.duration", unit="s"
    )
    histogram.record(0.25, {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"})
    assert built.shutdown(timeout=10)

    spans = {span.name: span for span in spans_in(receiver.traces())}
    assert set(spans) == {"design", "stage designs", "invoke_agent carlos", "chat gpt-4o"}
    chat = spans["chat gpt-4o"]
    assert (chat.trace_id, chat.span_id) == (trace_id, chat_id)
    assert chat.parent_id == spans["invoke_agent carlos"].span_id
    assert chat.kind == 3  # SPAN_KIND_CLIENT in the OTLP protobuf
    assert chat.attributes["gen_ai.usage.output_tokens"] == 340
    assert chat.events == [("retry", {"carlos.retry.cause": "APIConnectionError"})]
    assert chat.resource["service.name"] == "carlos-test"
    assert chat.resource["service.instance.id"] == "host-a:42"
    assert "gen_ai.client.operation.duration" in metric_names(receiver.metrics())
    described = built.describe()
    assert described["traces"] == {"otlp": f"{receiver.url}/v1/traces"}
    assert described["spans"]["otlp"] == {"exported": 4, "failed": 0, "dropped": 0, "waiting": 0}


def test_azure_monitor_export_reaches_a_local_ingestion_endpoint(azure_quiet, receiver):
    built = telemetry.build(
        {"APPLICATIONINSIGHTS_CONNECTION_STRING": connection_string(receiver.port)},
        instance="host-a:42",
    )
    trace_id, chat_id = a_design_like_trace(built.tracer_provider)
    # The spans first: Microsoft's exporter once raised "dictionary changed size during
    # iteration" while its trace and metric exporters sent at the same moment.
    assert built.tracer_provider.force_flush()
    counter = built.meter_provider.get_meter("carlos.pools").create_histogram(
        "gen_ai.client.token.usage", unit="{token}"
    )
    counter.record(340, {"gen_ai.token.type": "output", "gen_ai.request.model": "gpt-4o"})
    assert built.shutdown(timeout=10)

    envelopes = receiver.envelopes()
    assert {item.path for item in receiver.received} == {"/v2.1/track"}
    assert all(envelope["iKey"] == INSTRUMENTATION_KEY for envelope in envelopes)
    dependencies = {
        envelope["data"]["baseData"]["name"]: envelope
        for envelope in envelopes
        if envelope["data"]["baseType"] == "RemoteDependencyData"
    }
    assert {"chat gpt-4o", "invoke_agent carlos"} <= set(dependencies)
    chat = dependencies["chat gpt-4o"]
    assert chat["tags"]["ai.operation.id"] == trace_id
    assert chat["data"]["baseData"]["id"] == chat_id
    assert chat["tags"]["ai.cloud.role"] == "carlos"
    assert chat["tags"]["ai.cloud.roleInstance"] == "host-a:42"
    properties = chat["data"]["baseData"]["properties"]
    assert properties["gen_ai.request.model"] == "gpt-4o"
    assert properties["gen_ai.usage.output_tokens"] == "340"
    metrics = [
        metric["name"]
        for envelope in envelopes
        if envelope["data"]["baseType"] == "MetricData"
        for metric in envelope["data"]["baseData"]["metrics"]
    ]
    assert "gen_ai.client.token.usage" in metrics
    assert built.describe()["azure_monitor"] == {
        "ingestion_endpoint": f"http://127.0.0.1:{receiver.port}/",
        "instrumentation_key": MASKED_KEY,
    }


def test_a_collector_that_never_answers_never_holds_a_span_up(clean_env, silent):
    """Spans end at their normal pace while every export hangs; past the bounded queue they
    are dropped and counted; shutdown gives up after its bound, not the export timeout."""
    clean_env.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "30")  # an export hangs 30 s
    built = telemetry.build(
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{silent.url}/v1/traces",
            "OTEL_BSP_MAX_QUEUE_SIZE": "200",
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "50",
            "OTEL_BSP_SCHEDULE_DELAY": "10",
        }
    )
    tracer = built.tracer_provider.get_tracer("carlos.pools")
    with tracer.start_as_current_span("first"):
        pass
    # The exporter is then stuck in its first request.
    eventually_sync(lambda: silent.accepted_at, 20, what="the first export", interval=0.01)

    started = time.monotonic()
    for number in range(5000):
        with tracer.start_as_current_span("chat gpt-4o", attributes={"n": number}):
            pass
    ending_5000 = time.monotonic() - started
    assert ending_5000 < 5.0  # about 0.1 s here; one blocked export would be 30 s

    counts = built.span_processors["otlp"].counts.as_dict()
    # The queue's bound, plus the first span, in the hung export; the rest were dropped.
    assert counts == {"exported": 0, "failed": 0, "dropped": 5000 - 200, "waiting": 200 + 1}
    assert built.describe()["dropped_spans"] == counts["dropped"]

    started = time.monotonic()
    assert built.shutdown(timeout=1.0) is False  # gave up, with the spans still waiting
    assert time.monotonic() - started < 5.0


def test_a_collector_that_refuses_counts_failed_spans(clean_env):
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens: every export is refused
    clean_env.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    built = telemetry.build(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_BSP_SCHEDULE_DELAY": "10"}
    )
    tracer = built.tracer_provider.get_tracer("carlos.pools")
    for _ in range(3):
        with tracer.start_as_current_span("chat gpt-4o"):
            pass
    processor = built.span_processors["otlp"]
    eventually_sync(
        lambda: processor.counts.as_dict()["failed"] >= 3,
        20,
        what="three failed spans",
        state=processor.counts.as_dict,
    )
    assert processor.counts.as_dict()["exported"] == 0
    built.shutdown(timeout=2)


def test_an_invalid_connection_string_turns_azure_off_without_quoting_it(azure_quiet, caplog):
    built = telemetry.build(
        {"APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=not-a-guid-secret"}
    )
    assert built.tracer_provider is None and built.meter_provider is None
    assert "invalid" in built.errors["azure_monitor"]
    assert "not-a-guid-secret" not in caplog.text + json.dumps(built.errors)


# -- the process's telemetry, as operators see it ----------------------------------------------
def test_setup_is_once_per_process_and_off_without_a_destination(clean_env, monkeypatch):
    monkeypatch.setattr(telemetry, "_current", None)
    first = telemetry.setup(instance="h:1")
    assert telemetry.setup(instance="h:2") is first
    assert not first.installed
    assert telemetry.describe() == {"enabled": False, "reason": telemetry.NO_DESTINATION}
    assert telemetry.shutdown() is True


@pytest.fixture
def described_telemetry(azure_quiet, receiver, monkeypatch) -> Iterator[telemetry.Telemetry]:
    """The process's telemetry as if set up with OTLP and Azure (built, not installed)."""
    built = telemetry.build(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
            "APPLICATIONINSIGHTS_CONNECTION_STRING": connection_string(receiver.port),
        },
        instance="host-a:42",
    )
    built.installed = True
    monkeypatch.setattr(telemetry, "_current", built)
    try:
        yield built
    finally:
        built.shutdown(timeout=5)


async def probe_from(address: str) -> Any:
    """GET /health through the real ASGI application, from `address`."""
    import httpx

    from carlos.asgi import application

    transport = httpx.ASGITransport(app=application, client=(address, 40123))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await client.get("/health")


async def test_health_shows_operators_where_telemetry_goes_never_the_key(
    installed_registry, described_telemetry, receiver
):
    await installed_registry.initialize()
    operator = await probe_from("127.0.0.1")
    section = operator.json()["telemetry"]
    assert section["enabled"] is True
    assert section["traces"] == {
        "otlp": f"{receiver.url}/v1/traces",
        "azure_monitor": f"{receiver.url}/v2.1/track",
    }
    assert section["azure_monitor"]["instrumentation_key"] == MASKED_KEY
    assert section["dropped_spans"] == 0
    assert INSTRUMENTATION_KEY not in operator.text

    outsider = await probe_from("203.0.113.7")
    assert "telemetry" not in outsider.json()
    assert INSTRUMENTATION_KEY not in outsider.text


def test_pool_status_prints_the_telemetry_section():
    from pools.management.commands.pool_status import telemetry_lines, telemetry_state

    section = {
        "enabled": True,
        "service_name": "carlos",
        "service_instance_id": "host-a:42",
        "traces": {"otlp": "http://collector:4318/v1/traces"},
        "metrics": {"azure_monitor": "https://dc.example/v2.1/track", "interval_s": 60.0},
        "azure_monitor": {"ingestion_endpoint": "https://dc.example/", "instrumentation_key": "x"},
        "spans": {"queue_limit": 2048, "otlp": {"exported": 9, "failed": 1, "dropped": 2}},
    }
    text = "\n".join(telemetry_lines(section))
    assert "traces: OTLP http://collector:4318/v1/traces" in text
    assert "metrics: Azure Monitor https://dc.example/v2.1/track (every 60 s)" in text
    assert "spans to OTLP: 9 exported, 1 failed, 2 dropped (queue full)" in text
    assert telemetry_state(section) == "; telemetry on"
    assert telemetry_state({"enabled": False, "reason": "why"}) == "; telemetry off (why)"
    assert telemetry_state(None) == "" and telemetry_lines(None) == []


# -- log lines ---------------------------------------------------------------------------------
def test_log_lines_carry_the_trace_id_while_a_span_is_current():
    from opentelemetry.sdk.trace import TracerProvider

    # The console handler LOGGING configured (carlos.settings), its formatter and filters.
    console = next(
        handler
        for handler in logging.getLogger().handlers
        if any(isinstance(f, telemetry.TraceContextFilter) for f in handler.filters)
    )
    handler = logging.StreamHandler(StringIO())
    handler.setFormatter(console.formatter)
    for log_filter in console.filters:
        handler.addFilter(log_filter)
    log = logging.getLogger("tests.telemetry.lines")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("before")
        tracer = TracerProvider(shutdown_on_exit=False).get_tracer("carlos.pipeline")
        with tracer.start_as_current_span("design") as span:
            log.warning("during")
        log.warning("after")
    finally:
        log.removeHandler(handler)
    before, during, after = handler.stream.getvalue().splitlines()
    context = span.get_span_context()
    assert before.endswith("tests.telemetry.lines: before")
    assert during.endswith(f"during [trace={context.trace_id:032x} span={context.span_id:016x}]")
    assert after.endswith("tests.telemetry.lines: after")


# -- one design, end to end, in child processes ---------------------------------------------------
REQUEST = "A booking site for 20 clinics"
STAGES = {"requirements", "designs", "analyses", "audit", "recommendation", "terraform"}


@pytest.fixture(scope="module")
def migrated(tmp_path_factory) -> str:
    """A migrated SQLite database for this module's child processes (its URL)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('telemetry') / 'db.sqlite3'}"
    manage(child_env(url), "migrate", "--verbosity", "0")
    return url


@pytest.fixture
def llm_simulator() -> Iterator[Any]:
    """`manage.py llm_simulator` in a child, keeping a log of the requests it received."""
    simulator = start_simulator(
        ["--port", "0", "--request-log", "500"], manage_py=settings.BASE_DIR / "manage.py"
    )
    try:
        yield simulator
    finally:
        simulator.stop()


def design_env(database: str, **extra: str) -> dict[str, str]:
    env = child_env(database, **AZURE_QUIET, **extra)
    for name in OTEL_VARIABLES:
        if name not in extra:
            env.pop(name, None)
    return env


def simulator_requests(simulator: Any) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{simulator.root_url}/_simulator/requests", timeout=10) as reply:
        body = json.loads(reply.read())
    assert body["enabled"] and body["dropped"] == 0
    return body["requests"]


def test_one_design_is_one_trace_at_the_collector_and_in_application_insights(
    migrated, llm_simulator, receiver, tmp_path
):
    """`manage.py design` against a simulator child, exporting over OTLP and to Azure
    Monitor at once: the span tree, the GenAI attributes, the tokens the simulator reported
    (as the AgentRun rows store them), the traceparent the simulator received, the metrics,
    the trace id on the log lines; the instrumentation key nowhere in the output, at DEBUG."""
    env = design_env(
        migrated,
        LLM_SIMULATOR_URL=llm_simulator.base_url,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
        APPLICATIONINSIGHTS_CONNECTION_STRING=connection_string(receiver.port),
        OTEL_SERVICE_NAME="carlos-e2e",
        LOG_LEVEL="DEBUG",
        TMPDIR=str(tmp_path),
    )
    done = manage(env, "design", REQUEST, "--no-simulator", "--json")
    document = json.loads(done.stdout)
    assert document["design"]["status"] == "succeeded"
    runs = document["runs"]

    spans = spans_in(receiver.traces())
    roots = [span for span in spans if span.name == "design"]
    assert len(roots) == 1, [span.name for span in spans]
    root = roots[0]
    assert root.parent_id == ""
    assert root.attributes["carlos.design.id"] == document["design"]["id"]
    assert root.attributes["carlos.design.status"] == "succeeded"
    assert {span.trace_id for span in spans} == {root.trace_id}  # one design, one trace
    assert root.resource["service.name"] == "carlos-e2e"
    by_id = {span.span_id: span for span in spans}

    stages = [span for span in spans if span.name.startswith("stage ")]
    assert {span.attributes["carlos.stage"] for span in stages} == STAGES
    assert all(span.parent_id == root.span_id for span in stages)
    agents = [span for span in spans if span.name.startswith("invoke_agent ")]
    assert all(by_id[span.parent_id] in stages for span in agents)
    assert sorted(span.attributes["gen_ai.agent.name"] for span in agents) == sorted(
        run["agent"] for run in runs
    )
    chats = [span for span in spans if span.name.startswith("chat ")]
    assert len(chats) == len(runs)
    for chat in chats:
        agent = by_id[chat.parent_id]
        assert agent in agents
        run = next(
            run
            for run in runs
            if run["agent"] == agent.attributes["gen_ai.agent.name"]
            and run["round"] == agent.attributes["carlos.round"]
        )
        attributes = chat.attributes
        assert chat.kind == 3  # CLIENT
        assert chat.name == f"chat {run['model']}"
        assert attributes["gen_ai.operation.name"] == "chat"
        assert attributes["gen_ai.provider.name"] == "openai"
        assert attributes["gen_ai.request.model"] == run["model"]
        assert attributes["gen_ai.response.model"]
        assert attributes["gen_ai.response.id"]
        assert attributes["gen_ai.response.finish_reasons"] == ["stop"]
        assert attributes["gen_ai.request.temperature"] == pytest.approx(run["temperature"])
        assert attributes["server.address"] == "127.0.0.1"
        assert attributes["server.port"] == urlsplit(llm_simulator.base_url).port
        assert attributes["carlos.pool.name"] == run["pool"]
        # The simulator's usage, as the AgentRun row stores it.
        assert attributes["gen_ai.usage.input_tokens"] == run["tokens_in"] > 0
        assert attributes["gen_ai.usage.output_tokens"] == run["tokens_out"] > 0

    # Every request the simulator received carried the traceparent of its chat span.
    received = simulator_requests(llm_simulator)
    assert len(received) == len(chats)
    sent = [entry["traceparent"].split("-") for entry in received]
    assert sorted((version, trace_id, span_id) for version, trace_id, span_id, _ in sent) == sorted(
        ("00", chat.trace_id, chat.span_id) for chat in chats
    )
    assert all(int(flags, 16) & 1 for *_, flags in sent)  # sampled

    # Metrics: the GenAI client metrics and the pools' own, the tokens adding up.
    metrics = receiver.metrics()
    names = metric_names(metrics)
    assert {"gen_ai.client.operation.duration", "gen_ai.client.token.usage"} <= names
    assert any(name.startswith("carlos.pool.") for name in names), names
    output_tokens = 0
    for request in metrics[-1:]:  # cumulative: the last export holds the totals
        for resource_metrics in request.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.name == "gen_ai.client.token.usage":
                        for point in metric.histogram.data_points:
                            kind = attributes_of(point.attributes)["gen_ai.token.type"]
                            output_tokens += point.sum if kind == "output" else 0
    assert output_tokens == sum(run["tokens_out"] for run in runs)

    # The same trace in Application Insights: a dependency per call, with its GenAI facts.
    dependencies = [
        envelope
        for envelope in receiver.envelopes()
        if envelope["data"]["baseType"] == "RemoteDependencyData"
        and envelope["data"]["baseData"]["name"].startswith("chat ")
    ]
    assert len(dependencies) == len(chats)
    assert {envelope["tags"]["ai.operation.id"] for envelope in dependencies} == {root.trace_id}
    assert sorted(
        int(envelope["data"]["baseData"]["properties"]["gen_ai.usage.output_tokens"])
        for envelope in dependencies
    ) == sorted(run["tokens_out"] for run in runs)

    # The design's log lines carry its trace id; the key appears nowhere.
    output = done.stdout + done.stderr
    assert f"[trace={root.trace_id} span=" in output
    assert INSTRUMENTATION_KEY not in output


def test_a_collector_that_never_answers_does_not_slow_a_design(migrated, silent, tmp_path):
    """Every export hangs (30 s timeout) while the design runs: the design still takes its
    usual second or two, and the command exits soon after (the shutdown's bound)."""
    env = design_env(
        migrated,
        OTEL_EXPORTER_OTLP_ENDPOINT=silent.url,
        OTEL_EXPORTER_OTLP_TIMEOUT="30",
        OTEL_BSP_SCHEDULE_DELAY="20",  # exports start (and hang) while the design runs
        OTEL_METRIC_EXPORT_INTERVAL="200",
        TMPDIR=str(tmp_path),
    )
    started = time.time()
    done = manage(env, "design", REQUEST, "--fast", "--json")
    elapsed = time.time() - started
    design = json.loads(done.stdout)["design"]
    assert design["status"] == "succeeded"
    began = datetime.fromisoformat(design["started_at"]).timestamp()
    finished = datetime.fromisoformat(design["finished_at"]).timestamp()
    assert silent.accepted_at and silent.accepted_at[0] < finished  # hung during the design
    assert finished - began < 15  # about 1 s; a design that waited on export would take 30+
    assert elapsed < 30 + 5  # the exporter's timeout is 30 s: shutdown did not wait for it
    assert "did not finish within" in done.stderr


def test_serve_sets_telemetry_up_shows_it_to_operators_and_flushes_at_shutdown(receiver, tmp_path):
    """`manage.py serve` with both destinations: /health's operator view and `pool_status`
    say where traces and metrics go (the key masked); the metrics, exported every minute,
    reach the receivers at shutdown (the flush after the drain); the key is in no output."""
    env = design_env(
        f"sqlite:///{tmp_path / 'db.sqlite3'}",
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
        APPLICATIONINSIGHTS_CONNECTION_STRING=connection_string(receiver.port),
        TMPDIR=str(tmp_path),
    )
    log = tmp_path / "serve.log"
    with serving(env, log, "--migrate") as server:
        with urllib.request.urlopen(f"{server.base}/health", timeout=10) as reply:
            health = reply.read().decode()
        section = json.loads(health)["telemetry"]
        assert section["enabled"] is True
        assert section["traces"]["otlp"] == f"{receiver.url}/v1/traces"
        assert section["metrics"]["azure_monitor"] == f"{receiver.url}/v2.1/track"
        assert section["azure_monitor"]["instrumentation_key"] == MASKED_KEY
        assert section["service_instance_id"].endswith(f":{server.process.pid}")
        status = manage(env, "pool_status", "--url", server.base)
        assert "; telemetry on" in status.stdout.splitlines()[0]
        assert f"traces: OTLP {receiver.url}/v1/traces, Azure Monitor" in status.stdout
        assert f"instrumentation key {MASKED_KEY}" in status.stdout
        assert not receiver.metrics()  # every 60 s: none yet
        stop(server.process)
        assert server.process.returncode == 0, server.tail()
    names = metric_names(receiver.metrics())
    assert any(name.startswith("carlos.pool.") for name in names), names
    assert any(envelope["data"]["baseType"] == "MetricData" for envelope in receiver.envelopes())
    output = log.read_text() + health + status.stdout + status.stderr
    assert "📡 Telemetry on" in output
    assert INSTRUMENTATION_KEY not in output


async def test_the_lifespan_sets_up_before_warm_up_and_flushes_after_the_pools_close(
    installed_registry,
):
    """What uvicorn drives: `on_starting` first, `on_stopped` once the pools are closed (as
    carlos.asgi passes carlos.lifecycle.starting and .stopped)."""
    calls: list[tuple[str, bool, bool]] = []

    def starting() -> None:
        calls.append(("starting", installed_registry.usable, installed_registry.closed))

    async def stopped() -> None:
        calls.append(("stopped", installed_registry.usable, installed_registry.closed))

    app = PoolLifespan(lambda *args: None, on_starting=starting, on_stopped=stopped)
    inbox: asyncio.Queue = asyncio.Queue()
    for message in ({"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}):
        await inbox.put(message)
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    thresholds = gc.get_threshold()
    try:
        await asyncio.wait_for(app({"type": "lifespan"}, inbox.get, send), 10)
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert calls == [("starting", False, False), ("stopped", False, True)]


def test_the_asgi_application_passes_the_telemetry_hooks():
    from carlos import lifecycle
    from carlos.asgi import application

    assert application.on_starting is lifecycle.starting
    assert application.on_stopped is lifecycle.stopped
