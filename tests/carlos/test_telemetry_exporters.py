"""The real exporters, built in this process (their providers never installed), against real
receivers on loopback (`telemetry_receivers`): OTLP to a collector, Azure Monitor to a local
ingestion endpoint, and a collector that never answers or refuses: a bounded queue, spans
dropped and counted, never waited for.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from opentelemetry.trace import SpanKind

from carlos import telemetry
from tests.carlos.telemetry_receivers import (
    INSTRUMENTATION_KEY,
    MASKED_KEY,
    connection_string,
    metric_names,
    spans_in,
)
from tests.helpers.waiting import eventually_sync


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
