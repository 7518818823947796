"""Writing answers: status lines and headers, JSON and errors, chat completions and streams.

Every fault that shows on the wire (a stall, a reset, a truncated or malformed stream, a cut
or empty answer, missing usage) is decided up front in a `ResponsePlan` and acted out here,
so the counters in `SimulatorStats` match exactly what a client saw.
"""

import asyncio
import contextlib
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import h11

from pools.simulator.config import SimulatorConfig, SimulatorStats
from pools.simulator.ratelimits import RateLimits
from pools.simulator.requestlog import RequestLog
from pools.simulator.responders import ChatRequest, tokenize
from pools.simulator.wire import (
    Connection,
    ConnectionReset,
    HTTPError,
    base_headers,
    json_bytes,
    sse,
)

__all__ = ["FaultRolls", "ResponsePlan", "ResponseWriter", "plan_answer"]

SYSTEM_FINGERPRINT = "fp_carlos_sim"
_FAULT_AFTER_CHUNKS = 3

# What Azure attaches to a choice whose output its content filter stopped.
_FILTERED = {
    "hate": {"filtered": False, "severity": "safe"},
    "self_harm": {"filtered": False, "severity": "safe"},
    "sexual": {"filtered": False, "severity": "safe"},
    "violence": {"filtered": True, "severity": "medium"},
}


@dataclass
class ResponsePlan:
    """Everything decided before the first byte of a chat response is written."""

    request: ChatRequest
    tokens: list[str]
    finish_reason: str
    usage: dict[str, int] | None  # None: the no_usage fault (sent as usage: null)
    reset: bool
    stall: bool
    ttft_s: float = 0.0
    shape: str = "normal"  # normal | malformed | truncate | empty | content_filter | length
    include_usage: bool = False  # streams: send the usage chunk
    completion_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))

    def chunks(self) -> list[tuple[dict[str, Any], str | None]]:
        """(delta, finish_reason) per SSE chunk, before any fault cuts the stream."""
        if self.shape == "empty":
            return [({"role": "assistant", "content": ""}, None), ({}, self.finish_reason)]
        tokens = self.tokens or [""]
        last = len(tokens) - 1
        chunks: list[tuple[dict[str, Any], str | None]] = []
        for index, token in enumerate(tokens):
            delta: dict[str, Any] = {"content": token}
            if index == 0:
                delta = {"role": "assistant", **delta}
            chunks.append((delta, self.finish_reason if index == last else None))
        return chunks

    def filter_results(self) -> dict[str, Any]:
        """Azure's content_filter_results, on a choice its filter stopped (Azure paths only)."""
        if self.shape == "content_filter" and self.request.deployment is not None:
            return {"content_filter_results": _FILTERED}
        return {}

    def header(self, kind: str) -> dict[str, Any]:
        """The fields every chat.completion (or chunk) of this answer starts with."""
        return {
            "id": self.completion_id,
            "object": kind,
            "created": self.created,
            "model": self.request.model,
        }


@dataclass(frozen=True)
class FaultRolls:
    """The random draws of one admitted request, made whatever rates are set.

    Always three draws from the main generator (error, reset, stall) and five from the
    stream-fault one, so the fault sequence for a seed does not depend on which rates
    happen to be set, and the original three rolls per request are what they always were.
    """

    error: float
    reset: float
    stall: float
    truncate: float
    malformed: float
    empty: float
    length: float
    content_filter: float

    @classmethod
    def draw(cls, rng: random.Random, stream_rng: random.Random) -> "FaultRolls":
        error, reset, stall = (rng.random() for _ in range(3))
        truncate, malformed, empty, length, content_filter = (stream_rng.random() for _ in range(5))
        return cls(error, reset, stall, truncate, malformed, empty, length, content_filter)


def plan_answer(
    request: ChatRequest,
    text: str,
    *,
    config: SimulatorConfig,
    rolls: FaultRolls,
    faulty: bool,
    prompt_tokens: int,
    ttft_s: float,
) -> ResponsePlan:
    """Tokens, finish reason, usage and faults of one answer (at most one shape each)."""
    tokens = tokenize(text)
    finish_reason = "stop"
    if request.max_tokens is not None and len(tokens) > request.max_tokens:
        tokens = tokens[: request.max_tokens]
        finish_reason = "length"
    # At most one shape per response; when several rolls hit, the first one wins.
    shape = "normal"
    if faulty:
        if request.stream and rolls.malformed < config.malformed_rate:
            shape = "malformed"
        elif request.stream and rolls.truncate < config.truncate_rate:
            shape = "truncate"
        elif rolls.empty < config.empty_rate:
            shape = "empty"
            tokens, finish_reason = [], "stop"
        elif rolls.content_filter < config.content_filter_rate:
            shape = "content_filter"
            tokens, finish_reason = tokens[: len(tokens) // 3], "content_filter"
        elif rolls.length < config.length_rate:
            shape = "length"
            tokens, finish_reason = tokens[: len(tokens) // 2], "length"
    no_usage = faulty and bool(config.no_usage)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(tokens),
        "total_tokens": prompt_tokens + len(tokens),
    }
    return ResponsePlan(
        request=request,
        tokens=tokens,
        finish_reason=finish_reason,
        usage=None if no_usage else usage,
        reset=faulty and request.stream and rolls.reset < config.reset_rate,
        stall=faulty and rolls.stall < config.stall_rate,
        ttft_s=ttft_s,
        shape=shape,
        include_usage=request.include_usage and not no_usage,
    )


class ResponseWriter:
    """Sends every response, counting it and advertising the limits as it goes."""

    def __init__(self, config: SimulatorConfig, stats: SimulatorStats, limits: RateLimits):
        self.config = config
        self.stats = stats
        self.limits = limits

    # --- any response --------------------------------------------------------------------

    async def start(self, conn: Connection, status: int, headers: list[tuple[str, str]]) -> None:
        if conn.log_entry is not None:
            conn.log_entry["status"] = status
        if conn.count_response:
            self.stats.count_status(status)
            if status < 300:
                # Every successful API response advertises limits, like OpenAI's do.
                headers = [*headers, *self.limits.headers(conn.quota_windows)]
        await conn.send(h11.Response(status_code=status, headers=base_headers() + headers))

    async def json(
        self,
        conn: Connection,
        status: int,
        obj: Any,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        body = json_bytes(obj)
        await self.start(
            conn,
            status,
            [
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
                *(headers or []),
            ],
        )
        await conn.send_body(body)

    async def error(self, conn: Connection, err: HTTPError) -> None:
        if not conn.can_answer():
            conn.aborted = True
            return
        headers = list(err.headers)
        if err.close:
            headers.append(("connection", "close"))
        await self.json(conn, err.status, err.payload(), headers)

    async def protocol_error(self, conn: Connection, exc: h11.RemoteProtocolError) -> None:
        """Garbage on the wire gets a 400 (or h11's hint) and the connection is closed."""
        if conn.control is None:
            conn.control = False
        self.stats.requests_total += 1
        if not conn.can_answer():
            conn.aborted = True
            return
        err = HTTPError(
            exc.error_status_hint,
            f"Malformed HTTP request: {exc}",
            code="bad_request",
            close=True,
        )
        with contextlib.suppress(h11.LocalProtocolError):
            await self.error(conn, err)

    # --- faults --------------------------------------------------------------------------

    def _reset(self, conn: Connection) -> None:
        conn.reset()
        self.stats.resets += 1
        raise ConnectionReset

    async def _stall(self, conn: Connection) -> None:
        self.stats.stalls += 1
        await conn.pause(self.config.stall_seconds)

    # --- chat answers --------------------------------------------------------------------

    async def completion(self, conn: Connection, plan: ResponsePlan) -> None:
        """Non-streaming: wait the whole generation time, then send one chat.completion."""
        cfg = self.config
        generation = plan.ttft_s
        if cfg.tokens_per_second > 0:
            generation += len(plan.tokens) / cfg.tokens_per_second
        await conn.pause(generation)
        body = json_bytes(
            {
                **plan.header("chat.completion"),
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": "".join(plan.tokens),
                            "refusal": None,
                        },
                        "logprobs": None,
                        "finish_reason": plan.finish_reason,
                        **plan.filter_results(),
                    }
                ],
                "usage": plan.usage,
                "system_fingerprint": SYSTEM_FINGERPRINT,
            }
        )
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("openai-processing-ms", str(round(generation * 1000))),
        ]
        await self.start(conn, 200, headers)
        if plan.stall:
            half = len(body) // 2
            await conn.send(h11.Data(data=body[:half]))
            await self._stall(conn)
            body = body[half:]
        await conn.send_body(body)
        RequestLog.completed(conn.log_entry)

    async def stream(self, conn: Connection, plan: ResponsePlan) -> None:
        """SSE stream: one chunk per token, each flushed on its own schedule."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        await self.start(
            conn,
            200,
            [
                ("content-type", "text/event-stream; charset=utf-8"),
                ("cache-control", "no-cache"),
            ],
        )
        first_at = loop.time() + plan.ttft_s
        if plan.shape == "malformed":
            # One event cut off mid-JSON, then a clean end of the HTTP response.
            await conn.pause(first_at - loop.time())
            self.stats.malformed += 1
            broken = f'data: {{"id":"{plan.completion_id}","object":"chat.comp\n\n'
            await conn.send_body(broken.encode())
            return
        base = {**plan.header("chat.completion.chunk"), "system_fingerprint": SYSTEM_FINGERPRINT}
        usage_field = {"usage": None} if plan.include_usage else {}
        interval = 1 / cfg.tokens_per_second if cfg.tokens_per_second > 0 else 0.0
        fault_at = min(_FAULT_AFTER_CHUNKS, max(1, len(plan.tokens) // 2))
        truncate = plan.shape == "truncate"
        fault_done = False
        for index, (delta, finish_reason) in enumerate(plan.chunks()):
            if index == fault_at and (plan.reset or plan.stall):
                fault_done = True
                if plan.reset:
                    await conn.pause(first_at + index * interval - loop.time())
                    self._reset(conn)
                stall_started = loop.time()
                await self._stall(conn)
                first_at += loop.time() - stall_started
            if truncate and index == fault_at:
                break
            await conn.pause(first_at + index * interval - loop.time())
            choice = {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": None if truncate else finish_reason,
            }
            if finish_reason is not None and not truncate:
                choice.update(plan.filter_results())
            await conn.send(h11.Data(data=sse({**base, "choices": [choice], **usage_field})))
        if not fault_done and plan.reset:
            self._reset(conn)
        if not fault_done and plan.stall:
            await self._stall(conn)
        if truncate:
            # Cut: the HTTP response ends cleanly, but no finish_reason, usage or [DONE].
            self.stats.truncations += 1
            await conn.send_body()
            return
        usage_chunk = [sse({**base, "choices": [], "usage": plan.usage})]
        await conn.send_body(*(usage_chunk if plan.include_usage else []), b"data: [DONE]\n\n")
        RequestLog.completed(conn.log_entry)
