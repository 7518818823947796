"""The object an agent holds while it owns a slot: a model bound to its pool's settings.

`ainvoke` returns the whole answer with its token usage; `astream` yields text as the
endpoint produces it. Streams are tracked so that leaving the `async with` block closes any
stream still open: the connection is never handed to the next caller while a response is
still arriving on it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from pools.events import EventBus, EventKind, PoolEvent
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


class LLMStream:
    """Text chunks of one streamed completion; `usage` is known once it is fully read."""

    def __init__(self, handle: LLMHandle, messages: Messages, kwargs: dict[str, Any]) -> None:
        self._handle = handle
        self._messages = list(messages)
        self._kwargs = kwargs
        self._sdk_stream: Any = None
        self._iterator: AsyncIterator[str] | None = None
        self.usage: TokenUsage | None = None
        self.finish_reason: str | None = None
        self.first_token_ms: float | None = None
        self.closed = False

    def __aiter__(self) -> AsyncIterator[str]:
        if self._iterator is None:
            self._iterator = self._chunks()
        return self._iterator

    async def _chunks(self) -> AsyncIterator[str]:
        handle = self._handle
        started = time.perf_counter()
        try:
            kwargs = {"stream_options": {"include_usage": True}, **self._kwargs}
            self._sdk_stream = await handle.client.chat.completions.create(
                model=handle.model,
                temperature=handle.temperature,
                messages=self._messages,
                stream=True,
                **kwargs,
            )
            async for chunk in self._sdk_stream:
                if chunk.usage is not None:
                    self.usage = TokenUsage(
                        chunk.usage.prompt_tokens, chunk.usage.completion_tokens
                    )
                for choice in chunk.choices:
                    if choice.finish_reason:
                        self.finish_reason = choice.finish_reason
                    text = choice.delta.content if choice.delta else None
                    if text:
                        if self.first_token_ms is None:
                            self.first_token_ms = (time.perf_counter() - started) * 1000
                        yield text
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

    async def _release(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._handle._streams.discard(self)
        if self._sdk_stream is not None:
            await self._sdk_stream.close()

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
        self, pool: SlotPool, slot: Slot, client: AsyncOpenAI, events: EventBus | None = None
    ) -> None:
        self._pool = pool
        self._events = events or EventBus()
        self._slot = slot
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
        started = time.perf_counter()
        try:
            completion = await self.client.chat.completions.create(
                model=self.model, temperature=self.temperature, messages=list(messages), **kwargs
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc)
            raise
        choice = completion.choices[0] if completion.choices else None
        usage = completion.usage
        result = LLMResult(
            text=(choice.message.content or "") if choice else "",
            usage=TokenUsage(usage.prompt_tokens, usage.completion_tokens)
            if usage
            else TokenUsage(),
            model=completion.model,
            finish_reason=choice.finish_reason if choice else None,
            latency_ms=(time.perf_counter() - started) * 1000,
        )
        self._completed(result.latency_ms, None, result.usage)
        return result

    def astream(self, messages: Messages, **kwargs: Any) -> LLMStream:
        """Text chunks as they arrive; the stream holds the connection until read or closed."""
        stream = LLMStream(self, messages, kwargs)
        self._streams.add(stream)
        return stream

    def _completed(
        self, latency_ms: float, ttft_ms: float | None, usage: TokenUsage | None
    ) -> None:
        usage = usage or TokenUsage()
        self._events.emit(
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
        self._events.emit(
            PoolEvent(
                self.pool_name, EventKind.FAILED, error=type(exc).__name__, overflow=self.overflow
            )
        )

    async def _close_streams(self) -> None:
        for stream in list(self._streams):
            await stream.aclose()
