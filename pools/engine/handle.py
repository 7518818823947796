"""The object an agent holds while it owns a slot: a model bound to its pool's settings.

`ainvoke` returns the whole answer with its token usage; `astream` yields text as the
endpoint produces it. Both run through one driver (`_Call`): each attempt passes the rate
budget, the circuit breaker and the deployment's limiter (its 429 pause and learned
concurrency limit, `pools.engine.adaptive`); the pool's deadlines (first token, idle gap between
chunks, whole call) are enforced; what may pass is retried with backoff, a 429 is waited out
within the call's deadline. A stream is never retried once it has delivered text, and is
verified: an answer that ends without a finish reason is `TruncatedResponse`, never a whole
answer. Streams are tracked so that leaving the `async with` block closes any still open: a
connection is never handed to the next caller while a response is still arriving on it.
Each call is one OpenTelemetry span with its retries, 429 pauses and queueing as events, and
the GenAI client metrics (`pools.engine.telemetry`; no-ops while telemetry is off).
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from pools.engine.adaptive import DeploymentLimiter, LimitSettings, Outcome, Permit
from pools.engine.budget import RateBudget, estimate_tokens
from pools.engine.deadlines import SilenceWatch, data_waiting, within
from pools.engine.events import EventBus, EventKind, PoolEvent
from pools.engine.exceptions import (
    EmptyResponse,
    MalformedResponse,
    TruncatedResponse,
)
from pools.engine.resilience import CircuitBreaker, RetryPolicy, classify
from pools.engine.slots import Slot, SlotPool
from pools.engine.telemetry import call_telemetry

Messages = Iterable[ChatCompletionMessageParam]


@dataclass(frozen=True)
class TokenUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False  # the server sent no usage: counted from the text instead

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class LLMResult:
    text: str
    usage: TokenUsage
    model: str
    finish_reason: str | None
    latency_ms: float
    retries: int = 0


@dataclass
class Guard:
    """What protects one handle's calls: retry policy, breaker, limiter, where to report."""

    policy: RetryPolicy
    breaker: CircuitBreaker
    events: EventBus = field(default_factory=EventBus)
    budget: RateBudget | None = None
    default_output_tokens: int = 1000
    limiter: DeploymentLimiter | None = None
    adaptive: bool = True  # False: this pool obeys the pause but not the learned limit
    # What every call span and metric of the pool shares (pools.engine.telemetry, filled lazily).
    telemetry_attributes: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.limiter is None:
            self.limiter = DeploymentLimiter(self.breaker.name, LimitSettings())


def estimated_usage(messages: list[Any], completion_characters: int) -> TokenUsage:
    """Usage for a server that sent none: about four characters a token, marked estimated."""
    prompt = sum(len(str(message.get("content", ""))) for message in messages) // 4
    return TokenUsage(prompt + 4 * len(messages), -(-completion_characters // 4), estimated=True)


class _Call:
    """One call's attempts, for `ainvoke` and streams alike: the single retry driver.

    Iterate it and run each attempt in `async with attempt:`. Entering waits for admission
    (rate budget, breaker, the deployment's pause and limit); leaving with an exception
    records it and either waits before the next attempt (the exception is swallowed and the
    loop goes on) or lets it propagate. Leaving cleanly records a success and ends the loop.
    """

    def __init__(
        self, handle: LLMHandle, messages: list[Any], kwargs: dict[str, Any], *, stream: bool
    ) -> None:
        self.handle = handle
        self.messages = messages
        self.loop = asyncio.get_running_loop()
        self.started = time.perf_counter()
        self.ticket = time.monotonic()  # arrival: a retry keeps its place in the queue
        self.deadline = self.loop.time() + handle._pool.config.call_timeout
        self.estimate = handle._estimate(messages, kwargs)
        self.retries = 0  # retries of failures (MAX_RETRIES bounds these)
        self.rate_limited = 0  # 429s waited out (the deadline bounds these)
        self.done = False
        # The call's span (a child of the caller's current span) and metrics; ends once.
        self.telemetry = call_telemetry(handle, kwargs, stream=stream)

    def __aiter__(self) -> _Call:
        return self

    async def __anext__(self) -> _Attempt:
        if self.done:
            raise StopAsyncIteration
        return _Attempt(self)

    def left(self) -> float:
        return self.deadline - self.loop.time()

    @property
    def all_retries(self) -> int:
        """Retries of failures and 429s waited out: what `LLMResult.retries` reports."""
        return self.retries + self.rate_limited

    async def admit(self) -> Permit:
        arrived = self.loop.time()
        permit = await self._admit()
        self.telemetry.queued((self.loop.time() - arrived) * 1000)
        return permit

    async def _admit(self) -> Permit:
        guard = self.handle._guard
        budget = guard.budget
        if budget is not None and budget.limited:
            # The budget refills with time, not on an event: sleeping until then is the wait.
            while wait := await budget.reserve(self.estimate, max_wait=self.left()):  # noqa: ASYNC110
                await asyncio.sleep(wait)
        breaker = guard.breaker
        # A call already under way when the circuit opened waits for the probe (a sibling's
        # failure never fails a call that could still succeed); new calls fail fast.
        opened_wait = breaker.opened_since(self.ticket)
        if opened_wait is not None:
            if opened_wait >= self.left():
                raise breaker.refusal()
            await asyncio.sleep(opened_wait)
        assert guard.limiter is not None
        permit = await guard.limiter.acquire(
            self.ticket, max(0.0, self.left()), counted=guard.adaptive
        )
        try:
            # A half-open circuit's probe decides for everyone: wait for it, within the deadline.
            while (pause := breaker.before_attempt()) is not None:
                if self.loop.time() + pause >= self.deadline:
                    raise breaker.refusal()
                await asyncio.sleep(pause)
        except BaseException:
            guard.limiter.release(permit, Outcome.IGNORE)
            raise
        return permit

    def usage_or_estimate(self, usage: TokenUsage | None, characters: int) -> TokenUsage:
        return usage if usage is not None else estimated_usage(self.messages, characters)

    def reporting(
        self, *, stream: bool, ttft_ms: Callable[[], float | None] = lambda: None
    ) -> _Reporting:
        """Report a call that did not complete: a failure to the pool (error counter, FAILED
        event) and the span; a cancellation, or a stream closed early, to the span only."""
        return _Reporting(self, stream, ttft_ms)

    def completed(
        self,
        latency_ms: float,
        usage: TokenUsage | None,
        *,
        ttft_ms: float | None,
        response_model: str | None,
        response_id: str | None,
        finish_reason: str | None,
    ) -> None:
        """Report a completed call: the COMPLETED event, and the span and metrics."""
        self.handle._completed(latency_ms, ttft_ms, usage)
        self.telemetry.completed(
            response_model=response_model,
            response_id=response_id,
            finish_reason=finish_reason,
            usage=usage,
            ttft_ms=ttft_ms,
            retries=self.all_retries,
        )


class _Reporting:
    """`_Call.reporting`: a class, as a generator-based context manager costs every call
    about 5 µs more (on the 2-core machine)."""

    __slots__ = ("call", "stream", "ttft_ms")

    def __init__(self, call: _Call, stream: bool, ttft_ms: Callable[[], float | None]) -> None:
        self.call, self.stream, self.ttft_ms = call, stream, ttft_ms

    def __enter__(self) -> None:
        pass

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        call = self.call
        if exc is None:
            return
        if isinstance(exc, Exception):
            call.handle._failed(exc)
            call.telemetry.failed(exc, retries=call.all_retries, ttft_ms=self.ttft_ms())
            return
        # Neither completed nor failed: cancelled, or a stream closed early.
        closed = self.stream and not isinstance(exc, asyncio.CancelledError)
        outcome = "closed" if closed else "cancelled"
        call.telemetry.stopped(outcome, retries=call.all_retries, ttft_ms=self.ttft_ms())


class _Attempt:
    """One attempt of a `_Call`; the caller fills in what it learned before leaving."""

    def __init__(self, call: _Call) -> None:
        self.call = call
        self.permit: Permit | None = None
        self.sent_at = 0.0
        self.first_text_at: float | None = None  # monotonic, for the latency gradient
        self.headers: dict[str, str] | None = None  # x-ratelimit-*, for the limiter
        self.usage: TokenUsage | None = None
        self.delivered = False  # text reached the caller: never retried behind their back

    async def __aenter__(self) -> _Attempt:
        self.permit = await self.call.admit()
        self.sent_at = time.monotonic()
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        call, handle = self.call, self.call.handle
        guard = handle._guard
        limiter, permit = guard.limiter, self.permit
        assert limiter is not None and permit is not None
        if exc is None:
            ttft = None if self.first_text_at is None else self.first_text_at - self.sent_at
            limiter.release(permit, Outcome.SUCCESS, ttft_s=ttft, headers=self.headers)
            guard.breaker.record_success(started_at=self.sent_at)
            if guard.budget is not None and self.usage is not None:
                await guard.budget.settle(call.estimate, self.usage.total_tokens)
            call.done = True
            return False
        if not isinstance(exc, Exception):  # cancelled, or a stream closed early
            limiter.release(permit, Outcome.IGNORE)
            guard.breaker.release_probe()
            return False
        failure = classify(exc)
        limiter.release(permit, Outcome.DROP if failure.rate_limited else Outcome.IGNORE)
        if failure.breaker_failure:
            guard.breaker.record_failure(failure, type(exc).__name__)
        else:
            guard.breaker.release_probe()
        if self.delivered or not failure.retryable:
            return False
        if failure.rate_limited:
            call.rate_limited += 1
            handle._pool.record_rate_limited()
            wait = failure.retry_after
            if wait == 0 and call.rate_limited > 1:
                wait = None  # "now" did not work: back off instead of hammering
            paused = limiter.pause(wait, _pause_reason(failure.retry_after))
            handle._pool.record_retry()
            call.telemetry.rate_limited(paused)
            call.telemetry.retry(exc, call.all_retries, paused)
            return True  # the next admission waits out the pause, or says it cannot
        if call.retries >= handle._pool.config.max_retries:
            return False
        delay = guard.policy.delay(call.retries + 1, failure)
        if call.loop.time() + delay >= call.deadline:
            return False  # no time left for another attempt within the call's deadline
        call.retries += 1
        handle._pool.record_retry()
        call.telemetry.retry(exc, call.all_retries, delay)
        await asyncio.sleep(delay)
        return True


def rate_limit_headers(headers: httpx.Headers) -> dict[str, str]:
    """The response's x-ratelimit-* headers, which the limiter reads on every success, taken
    in one pass: each lookup in httpx's `Headers` decodes and compares every header."""
    return {
        name.decode("latin-1").lower(): value.decode("latin-1")
        for name, value in headers.raw
        if name[:12].lower() == b"x-ratelimit-"
    }


def _pause_reason(retry_after: float | None) -> str:
    if retry_after is None:
        return "429 without Retry-After"
    return f"429, Retry-After {retry_after:g}s"


class LLMStream:
    """Text chunks of one streamed completion; `usage` is known once it is fully read.

    Server-sent events are split from the raw bytes and decoded with `json.loads` rather
    than through the SDK's per-chunk objects: that costs a fraction of the CPU per token, and
    CPU per token is what limits how many designs one process can stream at once.
    """

    def __init__(self, handle: LLMHandle, messages: Messages, kwargs: dict[str, Any]) -> None:
        self._handle = handle
        self._messages = list(messages)
        self._kwargs = kwargs
        self._response: Any = None  # the SDK's streaming-response context manager
        self._request: Any = None
        self._iterator: AsyncGenerator[str] | None = None
        self.usage: TokenUsage | None = None
        self.finish_reason: str | None = None
        self.response_id: str | None = None  # from the chunk with usage or a finish reason
        self.response_model: str | None = None
        self.first_token_ms: float | None = None
        self._network_stream: Any = None
        self.deadline_extensions = 0  # deadlines that passed while data waited unread
        self.retries = 0
        self.closed = False

    def __aiter__(self) -> AsyncIterator[str]:
        if self._iterator is None:
            self._iterator = self._chunks()
        return self._iterator

    async def _open(self) -> tuple[AsyncIterator[bytes], Any]:
        """Start the request; the response's byte stream and headers, once they arrived."""
        handle = self._handle
        kwargs = {"stream_options": {"include_usage": True}, **self._kwargs}
        manager = handle.client.chat.completions.with_streaming_response.create(
            model=handle.model,
            temperature=handle.temperature,
            messages=self._messages,
            stream=True,
            **kwargs,
        )
        response = await manager.__aenter__()
        self._response = manager
        self._request = response.http_request
        self._network_stream = response.http_response.extensions.get("network_stream")
        return response.iter_bytes(), rate_limit_headers(response.headers)

    async def _next_bytes(self, reads: AsyncIterator[bytes]) -> bytes:
        """The next network read, with transport errors raised as the SDK's own exceptions."""
        try:
            return await anext(reads)
        except httpx.TimeoutException as exc:
            raise openai.APITimeoutError(request=self._request) from exc
        except httpx.HTTPError as exc:
            raise openai.APIConnectionError(request=self._request) from exc

    def _events(self, buffer: bytearray) -> list[str]:
        """Take the complete events out of `buffer`; return the texts they carry.

        One network read may hold many events when the reader falls behind, so the cost per
        token falls as the load rises: one deadline check per read, not per token.
        """
        end = buffer.rfind(b"\n\n")
        if end < 0:
            return []
        complete = bytes(buffer[: end + 2])
        del buffer[: end + 2]
        texts = []
        for line in complete.split(b"\n"):
            if line.startswith(b"data:") and not line.endswith(b"[DONE]"):
                try:
                    chunk = json.loads(line[5:])
                except ValueError:
                    raise MalformedResponse(
                        f"the endpoint sent a chunk that is not JSON: {bytes(line[:80])!r}"
                    ) from None
                if not isinstance(chunk, dict):
                    raise MalformedResponse(
                        f"the endpoint sent a chunk that is not an object: {bytes(line[:80])!r}"
                    )
                text = self._absorb(chunk)
                if text:
                    texts.append(text)
        return texts

    def _absorb(self, chunk: dict[str, Any]) -> str:
        """Take usage and finish reason from one chunk; return its text."""
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else None
            raise openai.APIError(
                message or "An error occurred during streaming", self._request, body=error
            )
        usage = chunk.get("usage")
        if usage:
            self.usage = TokenUsage(
                usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
            )
            self._identify(chunk)
        parts = []
        for choice in chunk.get("choices") or ():
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
                self._identify(chunk)
            content = (choice.get("delta") or {}).get("content")
            if content:
                parts.append(content)
        return "".join(parts)

    def _identify(self, chunk: dict[str, Any]) -> None:
        """The response's id and model, from a chunk read once per answer (not per token)."""
        self.response_id = chunk.get("id") or self.response_id
        self.response_model = chunk.get("model") or self.response_model

    async def _chunks(self) -> AsyncGenerator[str]:
        handle = self._handle
        config = handle._pool.config
        call = _Call(handle, self._messages, self._kwargs, stream=True)
        telemetry = call.telemetry
        characters = 0
        try:
            with call.reporting(stream=True, ttft_ms=lambda: self.first_token_ms):
                async for attempt in call:
                    async with attempt:
                        self.usage, self.finish_reason = None, None
                        watch = SilenceWatch(call.deadline, config.call_timeout)
                        try:
                            watch.expect("first_token", config.first_token_timeout)
                            with telemetry.current():  # the request carries the call's traceparent
                                reads, attempt.headers = await watch.read(self._open())
                            watch.data_waiting = functools.partial(
                                data_waiting, self._network_stream
                            )
                            buffer = bytearray()
                            while True:
                                try:
                                    data = await watch.read(self._next_bytes(reads))
                                except StopAsyncIteration:
                                    break  # read to the end: the connection is reusable
                                buffer += data.replace(b"\r\n", b"\n")
                                for text in self._events(buffer):
                                    if self.first_token_ms is None:
                                        self.first_token_ms = (
                                            time.perf_counter() - call.started
                                        ) * 1000
                                        attempt.first_text_at = time.monotonic()
                                    attempt.delivered = True
                                    characters += len(text)
                                    yield text
                                if attempt.delivered:  # before any text, first-token holds
                                    watch.expect("idle", config.idle_timeout)
                            self._verify(attempt.delivered, characters)
                            self.usage = call.usage_or_estimate(self.usage, characters)
                            attempt.usage = self.usage
                        except Exception:
                            await self._close_response()
                            raise
                        finally:
                            watch.close()
                            self.deadline_extensions += watch.extensions
                            self.retries = call.all_retries
            call.completed(  # read to the end
                (time.perf_counter() - call.started) * 1000,
                self.usage,
                ttft_ms=self.first_token_ms,
                response_model=self.response_model,
                response_id=self.response_id,
                finish_reason=self.finish_reason,
            )
        finally:
            try:
                await self._release()
            finally:
                telemetry.stopped("closed", retries=call.all_retries)  # if it has not ended

    def _verify(self, delivered: bool, characters: int) -> None:
        """A whole answer ends with a finish reason and has text (or says why it has none)."""
        if self.finish_reason is None:
            raise TruncatedResponse(
                f"the endpoint's stream ended without a finish reason after {characters} "
                "characters: the answer was cut off"
            )
        if not delivered and self.finish_reason == "stop":
            raise EmptyResponse("the model finished without any text")

    async def _close_response(self) -> None:
        if self._response is not None:
            response, self._response = self._response, None
            await response.__aexit__(None, None, None)

    async def _release(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._handle._streams.discard(self)
        await self._close_response()

    async def aclose(self) -> None:
        """Close the response so its connection goes back to the pool (or is dropped)."""
        if self._iterator is not None:
            await self._iterator.aclose()
        await self._release()

    async def text(self) -> str:
        """Read the rest of the stream and return it joined."""
        return "".join([chunk async for chunk in self])


class LLMHandle:
    """A model bound to a pool's model name and temperature, valid while the slot is held."""

    def __init__(
        self, pool: SlotPool, slot: Slot, client: AsyncOpenAI, guard: Guard | None = None
    ) -> None:
        self._pool = pool
        self._slot = slot
        self._guard = guard or Guard(RetryPolicy(), CircuitBreaker(pool.config.model))
        self.client = client
        self.pool_name = pool.name
        self.model = pool.config.model
        self.temperature = pool.config.temperature
        self._streams: set[LLMStream] = set()

    @property
    def overflow(self) -> bool:
        """True when this call runs on a temporary connection beyond the pool's size."""
        return self._slot.overflow

    @property
    def wait_ms(self) -> float:
        """How long the caller waited for the slot."""
        return self._slot.wait_ms

    async def ainvoke(self, messages: Messages, **kwargs: Any) -> LLMResult:
        """The whole completion at once, with its token usage."""
        config = self._pool.config
        call = _Call(self, list(messages), kwargs, stream=False)
        with call.reporting(stream=False), call.telemetry.current():
            result, response_id = await self._invoke(call, config.call_timeout, kwargs)
        call.completed(
            result.latency_ms,
            result.usage,
            ttft_ms=None,
            response_model=result.model,
            response_id=response_id,
            finish_reason=result.finish_reason,
        )
        return result

    async def _invoke(
        self, call: _Call, call_timeout: float, kwargs: dict[str, Any]
    ) -> tuple[LLMResult, str | None]:
        """The attempts of one `ainvoke`: the result and the response's id."""
        async for attempt in call:
            async with attempt:
                raw = await within(
                    self.client.chat.completions.with_raw_response.create(
                        model=self.model,
                        temperature=self.temperature,
                        messages=call.messages,
                        **kwargs,
                    ),
                    call.deadline,
                    "total",
                    call_timeout,
                )
                attempt.headers = rate_limit_headers(raw.headers)
                completion = raw.parse()
                choice = completion.choices[0] if completion.choices else None
                text = (choice.message.content or "") if choice else ""
                finish_reason = choice.finish_reason if choice else None
                if not text and finish_reason in ("stop", None):
                    raise EmptyResponse("the model finished without any text")
                usage = completion.usage
                attempt.usage = call.usage_or_estimate(
                    TokenUsage(usage.prompt_tokens, usage.completion_tokens) if usage else None,
                    len(text),
                )
        result = LLMResult(
            text=text,
            usage=attempt.usage or TokenUsage(),
            model=completion.model,
            finish_reason=finish_reason,
            latency_ms=(time.perf_counter() - call.started) * 1000,
            retries=call.all_retries,
        )
        return result, completion.id

    def astream(self, messages: Messages, **kwargs: Any) -> LLMStream:
        """Text chunks as they arrive; the stream holds the connection until read or closed."""
        stream = LLMStream(self, messages, kwargs)
        self._streams.add(stream)
        return stream

    # -- bookkeeping -----------------------------------------------------------------------
    def _estimate(self, messages: list[Any], kwargs: dict[str, Any]) -> int:
        budget = self._guard.budget
        if budget is None or not budget.limited:
            return 0
        return estimate_tokens(messages, kwargs, self._guard.default_output_tokens)

    def _completed(
        self, latency_ms: float, ttft_ms: float | None, usage: TokenUsage | None
    ) -> None:
        usage = usage or TokenUsage()
        self._guard.events.emit(
            PoolEvent(
                self.pool_name,
                EventKind.COMPLETED,
                latency_ms=latency_ms,
                ttft_ms=ttft_ms,
                tokens_in=usage.prompt_tokens,
                tokens_out=usage.completion_tokens,
                overflow=self.overflow,
            )
        )

    def _failed(self, exc: BaseException) -> None:
        self._pool.record_error()
        self._guard.events.emit(
            PoolEvent(
                self.pool_name, EventKind.FAILED, error=type(exc).__name__, overflow=self.overflow
            )
        )

    async def _close_streams(self) -> None:
        for stream in list(self._streams):
            await stream.aclose()
