"""The pool engine's OpenTelemetry instrumentation: a span per model call, GenAI metrics, the
pools' own gauges and counters, and the W3C `traceparent` on every request a call sends.

Only the OpenTelemetry API is used, through its global providers. Until a provider is set
(telemetry off, see `carlos.telemetry`) a call's telemetry is one shared object whose methods
do nothing: no span, no attribute, no metric, no header; the engine pays well under a
microsecond a call. Once one is set, the API's own no-ops cover what is not recorded.

- Each call made through a pool handle (`LLMHandle.ainvoke`, `LLMHandle.astream`) is one
  CLIENT span named `chat <request model>`, a child of whatever span is current when the call
  starts (the pipeline's agent span). It covers the whole operation: admission, every attempt
  and retry, and a stream until it is read to its end, closed or cancelled; it ends exactly
  once. Attributes follow the OpenTelemetry GenAI semantic conventions (`gen_ai.*`,
  `server.*`, `error.type`) plus the pool's facts (`carlos.*`); retries, 429 pauses and
  queueing are span events as they happen. No prompt, answer or error text is recorded: an
  endpoint's error message can quote the key it refused.
- Metrics: `gen_ai.client.operation.duration`, `gen_ai.client.token.usage` and, for streams,
  `gen_ai.client.operation.time_to_first_chunk` per call; the pools' gauges and counters
  (`carlos.pool.*`) are observed from `PoolRegistry.stats()`, the source `/metrics` and the
  snapshots read, and errors by kind from the registry's event bus, as `/metrics` counts them.

Django-free, like the rest of the engine.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from types import ModuleType
from typing import TYPE_CHECKING, Any

from openai import AsyncAzureOpenAI
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from pools.engine.events import EventKind, PoolEvent
from pools.engine.stats import DeploymentStats, PoolStats

if TYPE_CHECKING:
    from pools.engine.registry import PoolRegistry

logger = logging.getLogger("pools")

TRACER_NAME = "carlos.pools"
METER_NAME = "carlos.pools"
# The pipeline's tracer (agents.pipeline): named here so both sides agree.
PIPELINE_TRACER_NAME = "carlos.pipeline"

tracer = trace.get_tracer(TRACER_NAME)
meter = metrics.get_meter(METER_NAME)

# Whether a provider is set, read where the API keeps it (a module global each, set once per
# process by `set_tracer_provider` / `set_meter_provider`): asking through the public getters
# costs an environment lookup each, microseconds a call. An API without those globals, or a
# provider named by OTEL_PYTHON_*_PROVIDER (loaded by the getters), takes the public path.
_MISSING = object()
_trace_api: Any = trace
_metrics_api: ModuleType | None
try:
    from opentelemetry.metrics import _internal as _metrics_api
except ImportError:  # pragma: no cover - another API version
    _metrics_api = None
_PROVIDERS_FROM_ENVIRONMENT = bool(
    {"OTEL_PYTHON_TRACER_PROVIDER", "OTEL_PYTHON_METER_PROVIDER"} & set(os.environ)
)
_on = False


def telemetry_on() -> bool:
    """True once a TracerProvider or MeterProvider is set (an OpenTelemetry SDK); a provider
    is set once per process and never unset, so True stays True."""
    global _on
    if _on:
        return True
    tracer_provider = getattr(_trace_api, "_TRACER_PROVIDER", _MISSING)
    meter_provider = getattr(_metrics_api, "_METER_PROVIDER", _MISSING)
    if _MISSING in (tracer_provider, meter_provider) or _PROVIDERS_FROM_ENVIRONMENT:
        _on = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider) or (
            type(metrics.get_meter_provider()).__name__ != "_ProxyMeterProvider"
        )
    else:
        _on = tracer_provider is not None or meter_provider is not None
    return _on


# -- attribute names ---------------------------------------------------------------------------
# OpenTelemetry GenAI semantic conventions (development status; checked against the
# semantic-conventions-genai registry: gen_ai.provider.name replaced gen_ai.system).
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_TOKEN_TYPE = "gen_ai.token.type"
GEN_AI_AGENT_NAME = "gen_ai.agent.name"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
ERROR_TYPE = "error.type"
HTTP_STATUS_CODE = "http.response.status_code"
# The pool's own facts.
POOL_NAME = "carlos.pool.name"
POOL_SLOT_WAIT_MS = "carlos.pool.slot_wait_ms"
POOL_OVERFLOW = "carlos.pool.overflow"
POOL_BREAKER_STATE = "carlos.pool.breaker_state"
TIME_TO_FIRST_TOKEN_MS = "carlos.time_to_first_token_ms"
RETRIES = "carlos.retries"
STREAM = "carlos.stream"
OUTCOME = "carlos.outcome"  # completed | failed | closed (a stream closed early) | cancelled
USAGE_ESTIMATED = "carlos.usage.estimated"
RETRY_CAUSE = "carlos.retry.cause"
RETRY_ATTEMPT = "carlos.retry.attempt"
RETRY_DELAY_S = "carlos.retry.delay_s"
DEADLINE = "carlos.deadline"
PAUSE_SECONDS = "carlos.pause_seconds"
QUEUE = "carlos.queue"  # slot (the pool's slots) | deployment (its rate budget, limit, pause)
QUEUE_WAIT_MS = "carlos.queue_wait_ms"

# Span events.
EVENT_RETRY = "retry"
EVENT_RATE_LIMITED = "rate_limited"
EVENT_QUEUED = "queued"

OPERATION_CHAT = "chat"
OPERATION_INVOKE_AGENT = "invoke_agent"
PROVIDER_AZURE = "azure.ai.openai"
PROVIDER_OPENAI = "openai"
PROVIDER_BY_ENDPOINT_KIND = {"azure": PROVIDER_AZURE}  # openai and the simulator: "openai"
# Admission that took at least this long is reported as a `queued` event.
QUEUED_EVENT_MIN_MS = 1.0

# -- GenAI client metrics ------------------------------------------------------------------
# Bucket boundaries as the GenAI semantic conventions advise.
DURATION_BUCKETS: tuple[float, ...] = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
DURATION_BUCKETS += (5.12, 10.24, 20.48, 40.96, 81.92, 163.84, 327.68)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
TTFT_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)

METRIC_DURATION = "gen_ai.client.operation.duration"
METRIC_TOKEN_USAGE = "gen_ai.client.token.usage"
METRIC_TIME_TO_FIRST_CHUNK = "gen_ai.client.operation.time_to_first_chunk"

operation_duration = meter.create_histogram(
    METRIC_DURATION,
    unit="s",
    description="GenAI operation duration: a pool call from its start to its whole answer "
    "(every attempt and wait included), or to its failure.",
    explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
)
token_usage = meter.create_histogram(
    METRIC_TOKEN_USAGE,
    unit="{token}",
    description="Input and output tokens of completed pool calls, as the endpoint counted them.",
    explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
)
time_to_first_chunk = meter.create_histogram(
    METRIC_TIME_TO_FIRST_CHUNK,
    unit="s",
    description="Time from the start of a streamed pool call to its first text.",
    explicit_bucket_boundaries_advisory=TTFT_BUCKETS,
)


def provider_name(client: Any) -> str:
    """`gen_ai.provider.name` of an SDK client: Azure OpenAI, or OpenAI (and compatibles)."""
    return PROVIDER_AZURE if isinstance(client, AsyncAzureOpenAI) else PROVIDER_OPENAI


def server_of(client: Any) -> tuple[str, int]:
    """The endpoint's host and port, from the SDK client's base URL."""
    url = client.base_url
    port = url.port or (443 if url.scheme == "https" else 80)
    return url.host, port


def base_attributes(handle: Any) -> dict[str, Any]:
    """What every call of a pool shares: operation, provider, model, server, pool name.

    Cached on the pool's guard (one per pool, as long-lived as the registry).
    """
    guard = handle._guard
    cached: dict[str, Any] | None = guard.telemetry_attributes
    if cached is None:
        address, port = server_of(handle.client)
        cached = guard.telemetry_attributes = {
            GEN_AI_OPERATION_NAME: OPERATION_CHAT,
            GEN_AI_PROVIDER_NAME: provider_name(handle.client),
            GEN_AI_REQUEST_MODEL: handle.model,
            SERVER_ADDRESS: address,
            SERVER_PORT: port,
            POOL_NAME: handle.pool_name,
        }
    return cached


def error_type(exc: BaseException) -> str:
    """`error.type` of a failed call: the exception's class name (low cardinality, and the
    same kind `/metrics` counts errors by)."""
    return type(exc).__name__


def call_telemetry(handle: Any, kwargs: Mapping[str, Any], *, stream: bool) -> CallTelemetry:
    """The telemetry of a call starting now (`pools.engine.handle._Call`): its span, a child of the
    current span, and its metrics; with telemetry off, the shared do-nothing one."""
    if not telemetry_on():
        return OFF
    return CallTelemetry(handle, kwargs, stream=stream)


class CallTelemetry:
    """The span and metrics of one call through a pool handle; ends exactly once.

    With no span recorded (not sampled, or no TracerProvider) the span is the API's
    non-recording one and only the metrics are recorded.
    """

    __slots__ = ("_base", "_started", "ended", "recording", "span", "stream", "valid")

    def __init__(self, handle: Any, kwargs: Mapping[str, Any], *, stream: bool) -> None:
        self.stream = stream
        self.ended = False
        self._started = time.perf_counter()
        self._base = base_attributes(handle)
        self.span: Span = tracer.start_span(f"chat {handle.model}", kind=SpanKind.CLIENT)
        self.valid = self.span.get_span_context().is_valid
        self.recording = self.span.is_recording()
        if self.recording:
            attributes = {
                **self._base,
                GEN_AI_REQUEST_TEMPERATURE: handle.temperature,
                STREAM: stream,
                POOL_SLOT_WAIT_MS: round(handle.wait_ms, 3),
                POOL_OVERFLOW: handle.overflow,
                POOL_BREAKER_STATE: handle._guard.breaker.state.value,
            }
            max_tokens = kwargs.get("max_tokens") or kwargs.get("max_completion_tokens")
            if isinstance(max_tokens, int):
                attributes[GEN_AI_REQUEST_MAX_TOKENS] = max_tokens
            self.span.set_attributes(attributes)
            if handle._slot.queued:
                self.span.add_event(
                    EVENT_QUEUED, {QUEUE: "slot", QUEUE_WAIT_MS: round(handle.wait_ms, 3)}
                )

    def current(self) -> AbstractContextManager[Any]:
        """Make the call's span current (so the request hook injects its `traceparent`).

        Only around awaits that do not yield to the caller: a stream's caller must never run
        with the call's span current. With telemetry off, nothing to do.
        """
        if not self.valid:
            return _NOTHING
        return _Current(self.span)

    # -- events, as they happen --------------------------------------------------------------
    def queued(self, wait_ms: float) -> None:
        """Admission to the deployment (rate budget, circuit probe, learned limit, 429 pause)
        took `wait_ms`."""
        if self.recording and wait_ms >= QUEUED_EVENT_MIN_MS:
            self.span.add_event(
                EVENT_QUEUED, {QUEUE: "deployment", QUEUE_WAIT_MS: round(wait_ms, 3)}
            )

    def rate_limited(self, pause_s: float) -> None:
        """A 429: the deployment pauses `pause_s` seconds; the call waits it out."""
        if self.recording:
            self.span.add_event(EVENT_RATE_LIMITED, {PAUSE_SECONDS: round(pause_s, 3)})

    def retry(self, exc: BaseException, attempt: int, delay_s: float) -> None:
        """Retry number `attempt` (1 for the first) after `exc`, in `delay_s` seconds (for a
        429, the admission waits out the deployment's pause instead)."""
        if not self.recording:
            return
        attributes: dict[str, Any] = {
            RETRY_CAUSE: error_type(exc),
            RETRY_ATTEMPT: attempt,
            RETRY_DELAY_S: round(delay_s, 3),
        }
        _add_error_details(attributes, exc)
        self.span.add_event(EVENT_RETRY, attributes)

    # -- the end -----------------------------------------------------------------------------
    def completed(
        self,
        *,
        response_model: str | None,
        response_id: str | None,
        finish_reason: str | None,
        usage: Any,
        ttft_ms: float | None,
        retries: int,
    ) -> None:
        """The whole answer arrived: response attributes, usage, the metrics; the end."""
        if self.ended:
            return
        self.ended = True
        duration = time.perf_counter() - self._started
        metric_attributes = dict(self._base)
        if response_model:
            metric_attributes[GEN_AI_RESPONSE_MODEL] = response_model
        operation_duration.record(duration, metric_attributes)
        # Counted from the text when the server sent none: the conventions keep estimates
        # out of the usage metric (the span says they are estimated).
        if usage is not None and not usage.estimated:
            token_usage.record(
                usage.prompt_tokens, {**metric_attributes, GEN_AI_TOKEN_TYPE: "input"}
            )
            token_usage.record(
                usage.completion_tokens, {**metric_attributes, GEN_AI_TOKEN_TYPE: "output"}
            )
        if self.stream and ttft_ms is not None:
            time_to_first_chunk.record(ttft_ms / 1000, metric_attributes)
        if self.recording:
            attributes: dict[str, Any] = {OUTCOME: "completed", RETRIES: retries}
            if response_model:
                attributes[GEN_AI_RESPONSE_MODEL] = response_model
            if response_id:
                attributes[GEN_AI_RESPONSE_ID] = response_id
            if finish_reason:
                attributes[GEN_AI_RESPONSE_FINISH_REASONS] = (finish_reason,)
            if usage is not None:
                attributes[GEN_AI_USAGE_INPUT_TOKENS] = usage.prompt_tokens
                attributes[GEN_AI_USAGE_OUTPUT_TOKENS] = usage.completion_tokens
                if usage.estimated:
                    attributes[USAGE_ESTIMATED] = True
            if ttft_ms is not None:
                attributes[TIME_TO_FIRST_TOKEN_MS] = round(ttft_ms, 3)
                attributes[GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] = ttft_ms / 1000
            self.span.set_attributes(attributes)
        self.span.end()

    def failed(self, exc: BaseException, *, retries: int, ttft_ms: float | None = None) -> None:
        """The call raised `exc`: `error.type`, an error status naming only the class (never
        the endpoint's words), the duration metric with `error.type`; the end."""
        if self.ended:
            return
        self.ended = True
        kind = error_type(exc)
        operation_duration.record(
            time.perf_counter() - self._started, {**self._base, ERROR_TYPE: kind}
        )
        if self.recording:
            attributes: dict[str, Any] = {OUTCOME: "failed", RETRIES: retries, ERROR_TYPE: kind}
            _add_error_details(attributes, exc)
            if ttft_ms is not None:
                attributes[TIME_TO_FIRST_TOKEN_MS] = round(ttft_ms, 3)
            self.span.set_attributes(attributes)
            self.span.set_status(Status(StatusCode.ERROR, kind))
        self.span.end()

    def stopped(self, outcome: str, *, retries: int, ttft_ms: float | None = None) -> None:
        """Neither completed nor failed: a stream closed early (`closed`) or the call was
        cancelled (`cancelled`). No metric: `/metrics` counts neither."""
        if self.ended:
            return
        self.ended = True
        if self.recording:
            attributes: dict[str, Any] = {OUTCOME: outcome, RETRIES: retries}
            if ttft_ms is not None:
                attributes[TIME_TO_FIRST_TOKEN_MS] = round(ttft_ms, 3)
            self.span.set_attributes(attributes)
        self.span.end()


class _Current:
    """The span current in the block (attached and detached in the same task)."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: Span) -> None:
        self._span = span

    def __enter__(self) -> None:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))

    def __exit__(self, *exc_info: object) -> None:
        otel_context.detach(self._token)


_NOTHING = nullcontext()


class _Off(CallTelemetry):
    """Telemetry off: every method returns at once; one instance serves every call."""

    __slots__ = ()

    def __init__(self) -> None:
        self.stream = False
        self.ended = True
        self.recording = False
        self.valid = False
        self.span = trace.INVALID_SPAN

    def current(self) -> AbstractContextManager[Any]:
        return _NOTHING

    def queued(self, wait_ms: float) -> None:
        pass

    def rate_limited(self, pause_s: float) -> None:
        pass

    def retry(self, exc: BaseException, attempt: int, delay_s: float) -> None:
        pass

    def completed(self, **outcome: Any) -> None:
        pass

    def failed(self, exc: BaseException, **outcome: Any) -> None:
        pass

    def stopped(self, outcome: str, **details: Any) -> None:
        pass


OFF = _Off()


def _add_error_details(attributes: dict[str, Any], exc: BaseException) -> None:
    """The HTTP status an endpoint answered, or which deadline passed; never error text."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        attributes[HTTP_STATUS_CODE] = status
    deadline = getattr(exc, "deadline", None)
    if isinstance(deadline, str):
        attributes[DEADLINE] = deadline


# -- trace context on the wire -----------------------------------------------------------------
async def inject_trace_context(request: Any) -> None:
    """httpx request hook of the pools' clients: the current span's W3C `traceparent` (and
    `tracestate`) on the request. The OpenAI SDK sends from the caller's task, so the
    current span is the call's (`CallTelemetry.current`); with none, nothing is added."""
    if _on and trace.get_current_span().get_span_context().is_valid:
        propagate.inject(request.headers)


_trace_context = TraceContextTextMapPropagator()


def traceparent_of(span: Span) -> str:
    """The W3C traceparent of `span`, or "" for a span without a valid context (telemetry
    off)."""
    if not span.get_span_context().is_valid:
        return ""
    carrier: dict[str, str] = {}
    _trace_context.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def context_from_traceparent(traceparent: str) -> otel_context.Context:
    """A context whose parent is the remote span `traceparent` names, so a span started in
    it joins that trace; an empty context (a new trace) for "" or an invalid value."""
    empty = otel_context.Context()
    if not traceparent:
        return empty
    extracted = _trace_context.extract({"traceparent": traceparent}, context=empty)
    if not trace.get_current_span(extracted).get_span_context().is_valid:
        return empty
    return extracted


def trace_id_of(traceparent: str) -> str:
    """The 32-hex-digit trace id of a W3C traceparent ("" when there is none)."""
    parts = traceparent.split("-")
    if len(parts) == 4 and len(parts[1]) == 32:
        return parts[1]
    return ""


# -- the pools' gauges and counters -------------------------------------------------------------
# Read from `PoolRegistry.stats()` at collection time, the same figures `/metrics`
# (pools.engine.metrics) and the snapshots show: instrument name -> (its reader of the pool's
# typed stats, unit, description).
POOL_GAUGES: dict[str, tuple[Callable[[PoolStats], float], str, str]] = {
    "carlos.pool.size": (lambda pool: pool.total, "{slot}", "Configured slots of the pool."),
    "carlos.pool.in_use": (
        lambda pool: pool.in_use,
        "{slot}",
        "Slots in use, temporary (overflow) connections included.",
    ),
    "carlos.pool.available": (lambda pool: pool.available, "{slot}", "Pooled slots free."),
    "carlos.pool.overflow_in_use": (
        lambda pool: pool.overflow_in_use,
        "{connection}",
        "Temporary connections in use.",
    ),
    "carlos.pool.waiting": (lambda pool: pool.waiting, "{caller}", "Callers queued for a slot."),
}
POOL_COUNTERS: dict[str, tuple[Callable[[PoolStats], float], str, str]] = {
    "carlos.pool.requests": (lambda pool: pool.requests_num, "{request}", "Slots granted."),
    "carlos.pool.refusals": (
        lambda pool: pool.requests_refused,
        "{request}",
        "Callers refused at once (PoolExhausted).",
    ),
    "carlos.pool.timeouts": (
        lambda pool: pool.requests_timeouts,
        "{request}",
        "Queued callers that gave up (PoolTimeout).",
    ),
    "carlos.pool.rate_limited": (
        lambda pool: pool.requests_rate_limited,
        "{response}",
        "429 answers to the pool's calls (each pauses the deployment; the call waits, retries).",
    ),
    "carlos.pool.retries": (
        lambda pool: pool.requests_retries,
        "{retry}",
        "Attempts the pool's calls retried.",
    ),
}
# The pool's deployment limiter (pools.engine.adaptive), under each pool on it.
POOL_CONCURRENCY_GAUGES: dict[str, tuple[Callable[[DeploymentStats], float], str, str]] = {
    "carlos.pool.concurrency_limit": (
        lambda deployment: deployment.limit,
        "{request}",
        "Attempts the pool's deployment may have in flight: its learned concurrency limit.",
    ),
    "carlos.pool.deployment_in_flight": (
        lambda deployment: deployment.in_flight,
        "{request}",
        "Attempts in flight to the pool's deployment, from every pool on it.",
    ),
    "carlos.pool.deployment_paused": (
        lambda deployment: deployment.paused_s,
        "s",
        "Seconds left of the 429 pause of the pool's deployment (0: dispatch is open).",
    ),
}
METRIC_POOL_ERRORS = "carlos.pool.errors"

_registries: weakref.WeakSet[PoolRegistry] = weakref.WeakSet()
pool_errors = meter.create_counter(
    METRIC_POOL_ERRORS,
    unit="{error}",
    description="Calls that raised (error.type = exception class) and callers the pool "
    "refused (PoolTimeout, PoolExhausted, CircuitOpen...).",
)


def error_kind(event: PoolEvent) -> str:
    """The kind an error event counts under, as `/metrics` labels it."""
    return event.error or event.kind.value


def _observe_event(event: PoolEvent) -> None:
    """Event-bus observer (on the caller's path, cheap): errors by kind."""
    if event.kind is EventKind.FAILED or event.kind is EventKind.REFUSED:
        pool_errors.add(1, {POOL_NAME: event.pool, ERROR_TYPE: error_kind(event)})


def watch_registry(registry: PoolRegistry) -> None:
    """Report `registry`'s pools through the `carlos.pool.*` instruments (idempotent)."""
    _registries.add(registry)
    registry.events.subscribe(_observe_event)


def _pool_stats() -> Iterator[tuple[str, PoolStats]]:
    for registry in list(_registries):
        try:
            pools = registry.stats().pools
        except Exception:  # a metric must never break the exporter's collection
            logger.exception("pool stats for telemetry failed")
            continue
        yield from pools.items()


def _from_stats(read: Callable[[PoolStats], float]) -> Any:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(float(read(stats)), {POOL_NAME: pool}) for pool, stats in _pool_stats()]

    return observe


def _from_concurrency(read: Callable[[DeploymentStats], float]) -> Any:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(float(read(stats.concurrency)), {POOL_NAME: pool})
            for pool, stats in _pool_stats()
            if stats.concurrency
        ]

    return observe


for _name, (_read, _unit, _description) in POOL_GAUGES.items():
    meter.create_observable_gauge(_name, [_from_stats(_read)], _unit, _description)
for _name, (_read_deployment, _unit, _description) in POOL_CONCURRENCY_GAUGES.items():
    meter.create_observable_gauge(_name, [_from_concurrency(_read_deployment)], _unit, _description)
for _name, (_read, _unit, _description) in POOL_COUNTERS.items():
    meter.create_observable_counter(_name, [_from_stats(_read)], _unit, _description)
