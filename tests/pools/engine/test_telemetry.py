"""The pool engine's OpenTelemetry spans and metrics, against the real simulator.

Each test that reads telemetry takes the `otel` fixture: a fresh SDK TracerProvider (with an
in-memory span exporter) and MeterProvider (with an in-memory reader) for that test alone.
The global providers can be set only once per process, so `OtelHarness` installs, once,
providers that forward to the current test's SDK providers and are the API's no-op ones
otherwise: every other test runs as with telemetry off (no span, no `traceparent`).
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from pools.engine.config import parse_config
from pools.engine.registry import PoolRegistry
from pools.simulator.responders import count_prompt_tokens, tokenize
from tests.helpers.waiting import eventually

HELLO = [{"role": "user", "content": "Design a queue for the billing service"}]
ANSWER = "A durable queue with one consumer group per region, and a dead-letter topic."
FAST_BACKOFF = {"BACKOFF_BASE": 0.01, "BACKOFF_MAX": 0.02}


# -- the harness -------------------------------------------------------------------------------
class _SwitchTracer(trace.Tracer):
    """A tracer of the harness: the current test's SDK tracer, or the API's no-op one."""

    def __init__(self, harness: OtelHarness, args: tuple[Any, ...]) -> None:
        self._harness = harness
        self._args = args
        self._noop = trace.NoOpTracer()

    def _target(self) -> trace.Tracer:
        provider = self._harness.tracer_provider
        return self._noop if provider is None else provider.get_tracer(*self._args)

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        return self._target().start_span(*args, **kwargs)

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        return self._target().start_as_current_span(*args, **kwargs)


class _SwitchTracerProvider(trace.TracerProvider):
    def __init__(self, harness: OtelHarness) -> None:
        self._harness = harness

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _SwitchTracer(self._harness, (*args, *kwargs.values()))


class _SwitchInstrument:
    """An instrument of the harness, re-created on each test's SDK meter (callbacks too)."""

    def __init__(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._method, self._args, self._kwargs = method, args, kwargs
        self._real: Any = None

    def bind(self, meter: Any) -> None:
        self._real = (
            None if meter is None else getattr(meter, self._method)(*self._args, **self._kwargs)
        )

    def add(self, amount: Any, attributes: Any = None, context: Any = None) -> None:
        if self._real is not None:
            self._real.add(amount, attributes, context)

    def record(self, amount: Any, attributes: Any = None, context: Any = None) -> None:
        if self._real is not None:
            self._real.record(amount, attributes, context)

    def set(self, amount: Any, attributes: Any = None, context: Any = None) -> None:
        if self._real is not None:
            self._real.set(amount, attributes, context)


class _SwitchMeter:
    def __init__(self, harness: OtelHarness, args: tuple[Any, ...]) -> None:
        self._harness = harness
        self._args = args
        self.instruments: list[_SwitchInstrument] = []

    def bind(self, provider: MeterProvider | None) -> None:
        meter = None if provider is None else provider.get_meter(*self._args)
        for instrument in self.instruments:
            instrument.bind(meter)

    def _create(self, method: str, *args: Any, **kwargs: Any) -> _SwitchInstrument:
        instrument = _SwitchInstrument(method, args, kwargs)
        self.instruments.append(instrument)
        provider = self._harness.meter_provider
        if provider is not None:
            instrument.bind(provider.get_meter(*self._args))
        return instrument

    def __getattr__(self, method: str) -> Any:
        if method.startswith("create_"):
            return lambda *args, **kwargs: self._create(method, *args, **kwargs)
        raise AttributeError(method)


class _SwitchMeterProvider(metrics.MeterProvider):
    def __init__(self, harness: OtelHarness) -> None:
        self._harness = harness

    def get_meter(self, *args: Any, **kwargs: Any) -> Any:
        meter = _SwitchMeter(self._harness, (*args, *kwargs.values()))
        self._harness.meters.append(meter)
        return meter


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


SDK_LOGGERS = (
    "opentelemetry.sdk",
    "opentelemetry.trace",
    "opentelemetry.metrics",
    "opentelemetry.attributes",
    "opentelemetry.context",
)


class OtelHarness:
    """Global providers installed once per process, forwarding to one test's SDK providers."""

    _installed: OtelHarness | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.tracer_provider: TracerProvider | None = None
        self.meter_provider: MeterProvider | None = None
        self.meters: list[_SwitchMeter] = []
        self.spans = InMemorySpanExporter()
        self.reader: InMemoryMetricReader | None = None
        # What the SDK warned of (a span ended twice, an attribute set after its end...).
        self.sdk_warnings = _Warnings()

    @classmethod
    def install(cls) -> OtelHarness:
        with cls._lock:
            if cls._installed is None:
                if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
                    pytest.fail("a global TracerProvider is already set in this test process")
                harness = cls()
                trace.set_tracer_provider(_SwitchTracerProvider(harness))
                metrics.set_meter_provider(_SwitchMeterProvider(harness))
                cls._installed = harness
            return cls._installed

    def start(self) -> None:
        self.sdk_warnings.messages.clear()
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        for meter in self.meters:
            meter.bind(self.meter_provider)

    @classmethod
    @contextmanager
    def on(cls) -> Iterator[OtelHarness]:
        """Telemetry on for the block, read in memory; the SDK must not have warned of
        anything (a span ended twice, an attribute set on an ended span)."""
        harness = cls.install()
        harness.start()
        # The API and SDK's own loggers (span misuse, bad attributes); not the exporters',
        # whose retries may belong to another test's exporter still draining in its thread.
        sdk_loggers = [logging.getLogger(name) for name in SDK_LOGGERS]
        for sdk_logger in sdk_loggers:
            sdk_logger.addHandler(harness.sdk_warnings)
        try:
            yield harness
        finally:
            for sdk_logger in sdk_loggers:
                sdk_logger.removeHandler(harness.sdk_warnings)
            harness.stop()
        assert harness.sdk_warnings.messages == []

    def stop(self) -> None:
        for meter in self.meters:
            meter.bind(None)
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()
        self.tracer_provider = self.meter_provider = self.reader = None

    # -- reading -------------------------------------------------------------------------------
    def finished(self, name: str | None = None) -> list[ReadableSpan]:
        spans = list(self.spans.get_finished_spans())
        return [span for span in spans if name is None or span.name == name]

    def points(self, metric: str) -> list[Any]:
        """The data points of `metric` in one collection (cumulative since the test began)."""
        assert self.reader is not None
        data = self.reader.get_metrics_data()
        found = []
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for item in scope.metrics:
                    if item.name == metric:
                        found.extend(item.data.data_points)
        return found


@pytest.fixture
def otel() -> Iterator[OtelHarness]:
    """Telemetry on for this test: its spans and metrics, read in memory."""
    with OtelHarness.on() as harness:
        yield harness


# -- helpers -----------------------------------------------------------------------------------
@pytest.fixture
async def build(simulator_factory):
    """A registry with one pool (`main` unless named) against a fresh simulator."""
    made: list[PoolRegistry] = []

    async def factory(
        pool: dict | None = None, *, name: str = "main", resilience: dict | None = None, **sim
    ):
        sim.setdefault("request_log", 20)
        sim.setdefault("responder", lambda request: ANSWER)
        simulator = await simulator_factory(**sim)
        registry = PoolRegistry(
            parse_config(
                {
                    "ENDPOINT": {"SIMULATOR_URL": simulator.base_url},
                    "POOLS": {name: {"SIZE": 2, **(pool or {})}},
                    "RESILIENCE": {**FAST_BACKOFF, **(resilience or {})},
                }
            )
        )
        made.append(registry)
        return registry, simulator

    yield factory
    for registry in made:
        await registry.close()


async def stream_all(registry: PoolRegistry, pool: str = "main", **kwargs: Any) -> str:
    async with registry.acquire(pool) as llm:
        return await llm.astream(HELLO, **kwargs).text()


def the_one(spans: Sequence[ReadableSpan]) -> ReadableSpan:
    assert len(spans) == 1, [span.name for span in spans]
    return spans[0]


def events(span: ReadableSpan, name: str) -> list[dict[str, Any]]:
    return [dict(event.attributes or {}) for event in span.events if event.name == name]


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    context = span.get_span_context()
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


# -- spans -------------------------------------------------------------------------------------
async def test_a_streamed_call_is_one_chat_span_with_the_genai_attributes(otel, build) -> None:
    registry, sim = await build({"MODEL": "gpt-4o", "TEMPERATURE": 0.3})
    text = await stream_all(registry, max_tokens=500)

    span = the_one(otel.finished("chat gpt-4o"))
    attributes = dict(span.attributes or {})
    assert span.kind is SpanKind.CLIENT
    assert span.status.status_code is StatusCode.UNSET
    assert text == ANSWER
    # The tokens are the simulator's own count of this prompt and this answer.
    assert attributes["gen_ai.usage.input_tokens"] == count_prompt_tokens(HELLO)
    assert attributes["gen_ai.usage.output_tokens"] == len(tokenize(ANSWER))
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "openai"
    assert attributes["gen_ai.request.model"] == "gpt-4o"
    assert attributes["gen_ai.response.model"] == "gpt-4o"
    assert attributes["gen_ai.request.temperature"] == 0.3
    assert attributes["gen_ai.request.max_tokens"] == 500
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert str(attributes["gen_ai.response.id"]).startswith("chatcmpl")
    assert attributes["server.address"] == "127.0.0.1"
    assert attributes["server.port"] == sim.port
    assert attributes["carlos.pool.name"] == "main"
    assert attributes["carlos.pool.overflow"] is False
    assert attributes["carlos.pool.slot_wait_ms"] >= 0
    assert attributes["carlos.pool.breaker_state"] == "closed"
    assert attributes["carlos.stream"] is True
    assert attributes["carlos.retries"] == 0
    assert attributes["carlos.outcome"] == "completed"
    assert attributes["carlos.time_to_first_token_ms"] > 0
    assert "error.type" not in attributes


async def test_a_whole_answer_is_one_chat_span_too(otel, build) -> None:
    registry, _ = await build({"MODEL": "gpt-4o-mini"})
    async with registry.acquire("main") as llm:
        result = await llm.ainvoke(HELLO)

    attributes = dict(the_one(otel.finished("chat gpt-4o-mini")).attributes or {})
    assert attributes["gen_ai.usage.input_tokens"] == result.usage.prompt_tokens
    assert attributes["gen_ai.usage.input_tokens"] == count_prompt_tokens(HELLO)
    assert attributes["gen_ai.usage.output_tokens"] == len(tokenize(ANSWER))
    assert attributes["gen_ai.response.model"] == result.model
    assert attributes["carlos.stream"] is False
    assert "carlos.time_to_first_token_ms" not in attributes


async def test_an_azure_openai_call_names_its_provider(otel, simulator_factory) -> None:
    sim = await simulator_factory(responder=lambda request: ANSWER)
    registry = PoolRegistry(
        parse_config(
            {
                "ENDPOINT": {
                    "AZURE_ENDPOINT": sim.root_url,
                    "AZURE_API_KEY": "test-key",
                    "AZURE_API_VERSION": "2024-10-21",
                },
                "POOLS": {"main": {"MODEL": "gpt-4o", "SIZE": 1}},
            }
        )
    )
    try:
        await stream_all(registry)
    finally:
        await registry.close()
    attributes = the_one(otel.finished("chat gpt-4o")).attributes
    assert attributes["gen_ai.provider.name"] == "azure.ai.openai"
    assert (attributes["server.address"], attributes["server.port"]) == ("127.0.0.1", sim.port)
    assert "test-key" not in str(dict(attributes))


async def test_estimated_tokens_are_marked_and_kept_out_of_the_usage_metric(otel, build) -> None:
    registry, _ = await build(no_usage=1)
    await stream_all(registry)
    attributes = the_one(otel.finished("chat gpt-4o")).attributes
    assert attributes["carlos.usage.estimated"] is True
    assert attributes["gen_ai.usage.output_tokens"] > 0
    assert otel.points("gen_ai.client.token.usage") == []
    assert otel.points("gen_ai.client.operation.duration")[0].count == 1


def test_with_no_provider_set_a_call_takes_the_shared_do_nothing_path() -> None:
    """In a fresh process (no provider set, as in production with telemetry off): no span,
    no metric, no header, even with a valid span context current."""
    script = """
from opentelemetry import context, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from pools.engine import telemetry
assert not telemetry.telemetry_on()
assert telemetry.call_telemetry(None, {}, stream=True) is telemetry.OFF
remote = NonRecordingSpan(SpanContext(1, 2, is_remote=True, trace_flags=TraceFlags(1)))
token = context.attach(trace.set_span_in_context(remote))
class Request:
    headers = {}
import asyncio
asyncio.run(telemetry.inject_trace_context(Request))
assert Request.headers == {}, Request.headers
print("off")
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert done.stdout.strip() == "off", done.stderr


async def test_the_chat_span_is_a_child_of_the_callers_span(otel, build) -> None:
    registry, _ = await build()
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("invoke_agent requirements") as agent:
        await stream_all(registry)
        assert trace.get_current_span() is agent  # the stream left the caller's span current
    chat = the_one(otel.finished("chat gpt-4o"))
    assert chat.parent is not None and chat.parent.span_id == agent.get_span_context().span_id
    assert chat.context.trace_id == agent.get_span_context().trace_id


async def test_every_request_carries_the_chat_spans_traceparent(otel, build) -> None:
    """The OpenAI SDK calls the httpx request hook in the caller's task, so the hook sees the
    chat span current: the simulator's request log shows its ids, on every attempt."""
    registry, sim = await build({"MAX_RETRIES": 2}, next_429=1, retry_after_s=0)
    await stream_all(registry)
    async with registry.acquire("main") as llm:
        await llm.ainvoke(HELLO)

    streamed, invoked = otel.finished("chat gpt-4o")
    logged = sim.requests_log()
    assert [entry["stream"] for entry in logged] == [True, True, False]  # a 429, its retry
    for entry, span in zip(logged, [streamed, streamed, invoked], strict=True):
        version, trace_id, span_id, flags = entry["traceparent"].split("-")
        assert (version, trace_id, span_id) == ("00", *hex_ids(span))
        assert int(flags, 16) & 1  # sampled


async def test_without_telemetry_no_traceparent_is_sent(build) -> None:
    registry, sim = await build()
    await stream_all(registry)
    assert [entry["traceparent"] for entry in sim.requests_log()] == [None]


async def test_retries_are_events_with_their_cause(otel, build) -> None:
    registry, sim = await build({"MAX_RETRIES": 3}, error_rate=1.0)

    async def heal_after_two_attempts() -> None:
        while sim.stats.status_counts.get(500, 0) < 2:
            await asyncio.sleep(0.001)
        sim.apply_faults({"error_rate": 0.0})

    healer = asyncio.create_task(heal_after_two_attempts())
    text = await stream_all(registry)
    await healer

    span = the_one(otel.finished("chat gpt-4o"))
    retries = events(span, "retry")
    assert text == ANSWER
    assert [event["carlos.retry.attempt"] for event in retries] == [1, 2]
    assert {event["carlos.retry.cause"] for event in retries} == {"InternalServerError"}
    assert {event["http.response.status_code"] for event in retries} == {500}
    assert span.attributes["carlos.retries"] == 2
    assert span.status.status_code is StatusCode.UNSET


async def test_a_429_is_a_rate_limited_event_and_a_retry(otel, build) -> None:
    registry, sim = await build({"MAX_RETRIES": 0}, next_429=1, retry_after_s=0.2)
    async with registry.acquire("main") as llm:
        result = await llm.ainvoke(HELLO)

    span = the_one(otel.finished("chat gpt-4o"))
    (paused,) = events(span, "rate_limited")
    (retry,) = events(span, "retry")
    assert result.retries == 1 and sim.stats.status_counts[429] == 1
    assert paused["carlos.pause_seconds"] == pytest.approx(0.2)
    assert retry["carlos.retry.cause"] == "RateLimitError"
    assert retry["http.response.status_code"] == 429
    # The next attempt waited out the deployment's pause: queued, as it happened.
    (queued,) = events(span, "queued")
    assert queued["carlos.queue"] == "deployment" and queued["carlos.queue_wait_ms"] >= 150
    names = [event.name for event in span.events]
    assert names == ["rate_limited", "retry", "queued"]


async def test_waiting_for_a_slot_is_a_queued_event(otel, build) -> None:
    registry, _ = await build({"SIZE": 1, "MAX_OVERFLOW": 0}, ttft_ms=100)
    async with registry.acquire("main") as first:
        second = asyncio.create_task(stream_all(registry))
        await eventually(  # the second caller queues for the only slot
            lambda: registry.pools["main"].stats().waiting == 1, what="the second caller queues"
        )
        await first.astream(HELLO).text()
    await second

    queued = [span for span in otel.finished("chat gpt-4o") if events(span, "queued")]
    (span,) = queued
    (event,) = events(span, "queued")
    assert event["carlos.queue"] == "slot" and event["carlos.queue_wait_ms"] >= 40
    assert span.attributes["carlos.pool.slot_wait_ms"] == event["carlos.queue_wait_ms"]


async def test_a_failed_call_has_error_type_and_an_error_status(otel, build) -> None:
    registry, _ = await build({"MAX_RETRIES": 1}, error_rate=1.0)
    with pytest.raises(openai.InternalServerError):
        await stream_all(registry)

    span = the_one(otel.finished("chat gpt-4o"))
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "InternalServerError"  # never the endpoint's words
    assert span.attributes["error.type"] == "InternalServerError"
    assert span.attributes["http.response.status_code"] == 500
    assert span.attributes["carlos.outcome"] == "failed"
    assert span.attributes["carlos.retries"] == 1
    assert len(events(span, "retry")) == 1
    assert "exception" not in [event.name for event in span.events]  # no error text recorded


async def test_a_stream_closed_early_ends_its_span_once(otel, build) -> None:
    registry, _ = await build(tokens_per_second=200)
    async with registry.acquire("main") as llm:
        stream = llm.astream(HELLO)
        async for _chunk in stream:
            break
        await stream.aclose()
        await stream.aclose()  # a second close changes nothing
    # Leaving the block closes the handle's streams again: still one span, ended once.
    span = the_one(otel.finished("chat gpt-4o"))
    assert span.attributes["carlos.outcome"] == "closed"
    assert span.status.status_code is StatusCode.UNSET
    assert "gen_ai.usage.output_tokens" not in span.attributes


async def test_a_stream_left_open_is_ended_when_its_slot_is_released(otel, build) -> None:
    registry, _ = await build(tokens_per_second=200)
    async with registry.acquire("main") as llm:
        stream = llm.astream(HELLO)
        await anext(aiter(stream))
    span = the_one(otel.finished("chat gpt-4o"))
    assert span.attributes["carlos.outcome"] == "closed"


async def test_a_cancelled_call_ends_its_span(otel, build) -> None:
    registry, sim = await build(ttft_ms=5000)
    task = asyncio.create_task(stream_all(registry))
    await eventually(lambda: sim.stats.in_flight == 1, what="the call is under way")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    span = the_one(otel.finished("chat gpt-4o"))
    assert span.attributes["carlos.outcome"] == "cancelled"
    assert span.end_time is not None


# -- metrics -----------------------------------------------------------------------------------
async def test_each_call_records_the_genai_client_metrics(otel, build) -> None:
    registry, sim = await build()
    await stream_all(registry)
    async with registry.acquire("main") as llm:
        await llm.ainvoke(HELLO)

    (duration,) = otel.points("gen_ai.client.operation.duration")
    assert duration.count == 2 and duration.sum > 0
    assert dict(duration.attributes) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": "gpt-4o",
        "server.address": "127.0.0.1",
        "server.port": sim.port,
        "carlos.pool.name": "main",
    }
    usage = {
        point.attributes["gen_ai.token.type"]: point
        for point in otel.points("gen_ai.client.token.usage")
    }
    assert usage["input"].sum == 2 * count_prompt_tokens(HELLO) and usage["input"].count == 2
    assert usage["output"].sum == 2 * len(tokenize(ANSWER))
    (ttft,) = otel.points("gen_ai.client.operation.time_to_first_chunk")
    assert ttft.count == 1  # streams only


async def test_a_failed_call_records_its_duration_with_error_type(otel, build) -> None:
    registry, _ = await build({"MAX_RETRIES": 0}, error_rate=1.0)
    with pytest.raises(openai.InternalServerError):
        await stream_all(registry)
    (duration,) = otel.points("gen_ai.client.operation.duration")
    assert duration.attributes["error.type"] == "InternalServerError"
    assert otel.points("gen_ai.client.token.usage") == []
    (errors,) = otel.points("carlos.pool.errors")
    assert errors.value == 1 and errors.attributes["error.type"] == "InternalServerError"


async def test_the_pool_gauges_and_counters_read_the_registry_stats(otel, build) -> None:
    registry, _ = await build({"SIZE": 3, "MODEL": "gpt-4o"}, name="otelgauges", ttft_ms=200)
    pool = "otelgauges"
    await stream_all(registry, pool)
    async with registry.acquire(pool):

        def value(metric: str) -> float:
            (point,) = [
                point
                for point in otel.points(metric)
                if point.attributes["carlos.pool.name"] == pool
            ]
            return point.value

        stats = registry.stats().pools[pool]
        assert value("carlos.pool.size") == stats.total == 3
        assert value("carlos.pool.in_use") == stats.in_use == 1
        assert value("carlos.pool.available") == stats.available == 2
        assert value("carlos.pool.overflow_in_use") == stats.overflow_in_use == 0
        assert value("carlos.pool.waiting") == stats.waiting == 0
        assert value("carlos.pool.requests") == stats.requests_num == 2
        assert value("carlos.pool.refusals") == stats.requests_refused == 0
        assert value("carlos.pool.rate_limited") == stats.requests_rate_limited == 0
        assert value("carlos.pool.concurrency_limit") == stats.concurrency.limit
        assert value("carlos.pool.deployment_in_flight") == stats.concurrency.in_flight
