"""Telemetry as the environment asks for it and as operators see it (carlos.telemetry).

What the OTEL_* and Application Insights variables choose, the instrumentation key masked
wherever it is shown, setup once a process, /health and `pool_status` telling where telemetry
goes, and the trace id on log lines.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from io import StringIO
from typing import Any

import pytest

from carlos import telemetry
from tests.carlos.telemetry_receivers import (
    INSTRUMENTATION_KEY,
    MASKED_KEY,
    connection_string,
)


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
