"""The object an agent holds while it owns a slot: a model bound to its pool's settings.

`ainvoke` returns the whole answer with its token usage; `astream` yields text as the
endpoint produces it. Both enforce the pool's deadlines (first token, idle gap between
chunks, whole call), retry what may pass with backoff that honours the server's
`Retry-After`, and report every attempt to the deployment's circuit breaker. A stream is
never retried once it has delivered text. Streams are tracked so that leaving the
`async with` block closes any still open: a connection is never handed to the next caller
while a response is still arriving on it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from pools.budget import RateBudget, estimate_tokens
from pools.events import EventBus, EventKind, PoolEvent
from pools.exceptions import DeadlineExceeded
from pools.resilience import CircuitBreaker, RetryPolicy, classify
from pools.slots import Slot, SlotPool

Messages = Iterable[ChatCompletionMessageParam]


@dataclass(frozen=True)
class TokenUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

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
    """What protects one handle's calls: retry policy, breaker, and where to report."""

    policy: RetryPolicy
    breaker: CircuitBreaker
    events: EventBus = field(default_factory=EventBus)
    budget: RateBudget | None = None
    default_output_tokens: int = 1000


async def _within[T](awaitable: Awaitable[T], deadline: float, which: str, seconds: float) -> T:
    """Await with an absolute loop-time deadline, raising `DeadlineExceeded(which)`."""
    try:
        async with asyncio.timeout_at(deadline):
            return await awaitable
    except TimeoutError as exc:
        if isinstance(exc, DeadlineExceeded):
            raise
        raise DeadlineExceeded(which, seconds) from None


class _SilenceWatch:
    """The first-token and idle deadlines of one streamed attempt, for reads only.

    A deadline is meant for an upstream that went silent, not for an event loop too busy to
    read what already arrived: when it passes while bytes wait unread on the connection, it
    is extended (counted in `extensions`) instead of failing the call and counting a failure
    against the deployment's breaker. The whole-call deadline is never extended. One timer
    per deadline period, re-armed lazily, rather than one per read: reads are per token.
    """

    def __init__(self, call_deadline: float, call_timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._call_deadline = call_deadline
        self._call_timeout = call_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._reader: asyncio.Task | None = None
        self._expires_at = 0.0
        self.which, self.seconds = "total", call_timeout
        self.expired = False
        self.extensions = 0
        # Set once the response's connection is known; until then a deadline is not extended.
        self.data_waiting: Callable[[], bool] = lambda: False

    def expect(self, which: str, seconds: float) -> None:
        """The upstream must send something within `seconds` from now."""
        expires_at = self._loop.time() + seconds
        if expires_at >= self._call_deadline:  # name the deadline that really binds
            expires_at, which, seconds = self._call_deadline, "total", self._call_timeout
        self._expires_at, self.which, self.seconds = expires_at, which, seconds

    async def read[T](self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable`, raising `DeadlineExceeded` if the upstream stays silent."""
        task = asyncio.current_task()
        self._reader = task
        if self._timer is None or self._timer.when() > self._expires_at:
            if self._timer is not None:  # the deadline moved earlier (first token -> idle)
                self._timer.cancel()
            self._timer = self._loop.call_at(self._expires_at, self._check)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self.expired and task is not None and task.uncancel() == 0:
                raise DeadlineExceeded(self.which, self.seconds) from None
            raise
        finally:
            self._reader = None

    def _check(self) -> None:
        self._timer = None
        if self._reader is None:
            return  # between reads: the next read re-arms
        now = self._loop.time()
        if now < self._expires_at:
            self._timer = self._loop.call_at(self._expires_at, self._check)
            return
        if now < self._call_deadline and self.data_waiting():
            self.extensions += 1  # the loop was late, not the upstream
            self._timer = self._loop.call_at(now + 0.05, self._check)
            return
        self.expired = True
        self._reader.cancel()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _data_waiting(network_stream: Any) -> bool:
    """True when the connection has bytes nobody has read yet (or the peer closed it)."""
    try:
        return bool(network_stream.get_extra_info("is_readable"))
    except Exception:  # a stream that cannot tell is treated as silent
        return False


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
        self._iterator: AsyncIterator[str] | None = None
        self.usage: TokenUsage | None = None
        self.finish_reason: str | None = None
        self.first_token_ms: float | None = None
        self._network_stream: Any = None
        self.deadline_extensions = 0  # deadlines that passed while data waited unread
        self.retries = 0
        self.closed = False

    def __aiter__(self) -> AsyncIterator[str]:
        if self._iterator is None:
            self._iterator = self._chunks()
        return self._iterator

    async def _open(self) -> AsyncIterator[bytes]:
        """Start the request; the response's lines, once its headers have arrived."""
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
        return response.iter_bytes()

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
                text = self._absorb(json.loads(line[5:]))
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
        parts = []
        for choice in chunk.get("choices") or ():
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            content = (choice.get("delta") or {}).get("content")
            if content:
                parts.append(content)
        return "".join(parts)

    async def _chunks(self) -> AsyncIterator[str]:
        handle = self._handle
        config = handle._pool.config
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        call_deadline = loop.time() + config.call_timeout
        attempt = 0
        delivered = False
        estimate = handle._estimate(self._messages, self._kwargs)
        try:
            while True:
                await handle._admit(estimate, call_deadline)
                watch = _SilenceWatch(call_deadline, config.call_timeout)
                try:
                    watch.expect("first_token", config.first_token_timeout)
                    reads = await watch.read(self._open())
                    watch.data_waiting = functools.partial(_data_waiting, self._network_stream)
                    buffer = bytearray()
                    while True:
                        try:
                            data = await watch.read(self._next_bytes(reads))
                        except StopAsyncIteration:
                            break  # read to the end, past [DONE]: the connection is reusable
                        buffer += data.replace(b"\r\n", b"\n")
                        for text in self._events(buffer):
                            if self.first_token_ms is None:
                                self.first_token_ms = (time.perf_counter() - started) * 1000
                            delivered = True
                            yield text
                        if delivered:  # before the first text, the first-token deadline holds
                            watch.expect("idle", config.idle_timeout)
                except asyncio.CancelledError:
                    handle._abandon_attempt()
                    raise
                except Exception as exc:
                    await self._close_response()
                    if delivered:  # the user has seen tokens: never retry behind their back
                        handle._attempt_failed(exc)
                        raise
                    await handle._after_failure(exc, attempt, call_deadline)
                    attempt += 1
                    self.retries = attempt
                    continue
                finally:
                    watch.close()
                    self.deadline_extensions += watch.extensions
                await handle._attempt_succeeded(estimate, self.usage)
                break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            handle._failed(exc)
            raise
        else:  # read to the end (a stream closed early is neither completed nor failed)
            latency_ms = (time.perf_counter() - started) * 1000
            handle._completed(latency_ms, self.first_token_ms, self.usage)
        finally:
            await self._release()

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
        messages = list(messages)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        call_deadline = loop.time() + config.call_timeout
        attempt = 0
        estimate = self._estimate(messages, kwargs)
        try:
            while True:
                await self._admit(estimate, call_deadline)
                try:
                    completion = await _within(
                        self.client.chat.completions.create(
                            model=self.model,
                            temperature=self.temperature,
                            messages=messages,
                            **kwargs,
                        ),
                        call_deadline,
                        "total",
                        config.call_timeout,
                    )
                except asyncio.CancelledError:
                    self._abandon_attempt()
                    raise
                except Exception as exc:
                    await self._after_failure(exc, attempt, call_deadline)
                    attempt += 1
                    continue
                usage = completion.usage
                await self._attempt_succeeded(
                    estimate,
                    TokenUsage(usage.prompt_tokens, usage.completion_tokens) if usage else None,
                )
                break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc)
            raise
        choice = completion.choices[0] if completion.choices else None
        result = LLMResult(
            text=(choice.message.content or "") if choice else "",
            usage=TokenUsage(usage.prompt_tokens, usage.completion_tokens)
            if usage
            else TokenUsage(),
            model=completion.model,
            finish_reason=choice.finish_reason if choice else None,
            latency_ms=(time.perf_counter() - started) * 1000,
            retries=attempt,
        )
        self._completed(result.latency_ms, None, result.usage)
        return result

    def astream(self, messages: Messages, **kwargs: Any) -> LLMStream:
        """Text chunks as they arrive; the stream holds the connection until read or closed."""
        stream = LLMStream(self, messages, kwargs)
        self._streams.add(stream)
        return stream

    # -- one attempt's bookkeeping -------------------------------------------------------
    def _estimate(self, messages: list[Any], kwargs: dict[str, Any]) -> int:
        budget = self._guard.budget
        if budget is None or not budget.limited:
            return 0
        return estimate_tokens(messages, kwargs, self._guard.default_output_tokens)

    async def _admit(self, estimate: int, call_deadline: float) -> None:
        """Wait for the deployment's rate budget (bounded), then pass the circuit breaker."""
        budget = self._guard.budget
        if budget is not None and budget.limited:
            loop = asyncio.get_running_loop()
            # The budget refills with time, not on an event: sleeping until then is the wait.
            while wait := await budget.reserve(estimate, max_wait=call_deadline - loop.time()):  # noqa: ASYNC110
                await asyncio.sleep(wait)
        # A half-open circuit's probe decides for everyone: wait for it, within the deadline.
        while (pause := self._guard.breaker.before_attempt()) is not None:
            if asyncio.get_running_loop().time() + pause >= call_deadline:
                raise self._guard.breaker.refusal()
            await asyncio.sleep(pause)

    async def _attempt_succeeded(self, estimate: int, usage: TokenUsage | None) -> None:
        self._guard.breaker.record_success()
        if self._guard.budget is not None and usage is not None:
            await self._guard.budget.settle(estimate, usage.total_tokens)

    def _abandon_attempt(self) -> None:
        self._guard.breaker.release_probe()

    def _attempt_failed(self, exc: BaseException) -> None:
        self._guard.breaker.record_failure(classify(exc), type(exc).__name__)

    async def _after_failure(self, exc: Exception, attempt: int, call_deadline: float) -> None:
        """Record a failed attempt, then wait before the next one or re-raise."""
        self._attempt_failed(exc)
        failure = classify(exc)
        policy = self._guard.policy
        if not failure.retryable or attempt >= self._pool.config.max_retries:
            raise exc
        delay = policy.delay(attempt + 1, failure)
        loop = asyncio.get_running_loop()
        if loop.time() + delay >= call_deadline:
            raise exc  # no time left for another attempt within the call's deadline
        self._pool.record_retry()
        await asyncio.sleep(delay)

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
