"""The loopback receivers the telemetry tests export to, and how they decode what came.

Plain HTTP servers in the test process: an OTLP/HTTP collector that decodes the protobuf
payloads with the official `opentelemetry-proto` messages, an Application Insights ingestion
endpoint that records the JSON envelopes Microsoft's exporter posts to `/v2.1/track`, and a
collector that accepts connections and never answers. Their fixtures are in `conftest.py`.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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

from tests.helpers.waiting import eventually_sync

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
                from pools.benchmark import reply_ok

                reply_ok(self, content, kind)

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
