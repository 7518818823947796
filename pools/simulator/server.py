"""An offline, OpenAI-compatible chat-completions server in plain asyncio + h11.

Why it exists: Carlos's connection pools must be tested for reuse, pacing, back-pressure and
fault handling without a network or a real model. Driving HTTP/1.1 ourselves through h11
gives exact control over every connection (keep-alive, resets, stalls), and the counters in
`SimulatorStats` let tests prove what the client side did on the wire.

What it can send, so pools are tested against the protocol rather than our simplifications
(every setting is a `SimulatorConfig` field; those in `FAULT_FIELDS` can also be changed on
a running server through `apply_faults` or `POST /_simulator/faults`):

- Latency: `ttft_ms` (+ `ttft_per_request_ms` for every other chat request already in
  flight, as on a loaded GPU), `tokens_per_second`, `rtt_ms`.
- Back-pressure: `capacity` (concurrent chat requests; beyond it, 429), and the per-key
  quota of Azure OpenAI deployments: `quota_rpm` / `quota_tpm` over a sliding
  `quota_window_s`, kept per (API key, model/deployment). Every API request counts against
  RPM (a models list counts against each of the key's models); chat requests are charged
  TPM on arrival (prompt + `max_tokens`, or `QUOTA_DEFAULT_MAX_TOKENS`). A request that
  does not fit gets a 429 whose retry-after is the exact wait, and is not charged.
- Scripted 429s: `next_429` answers the next N chat requests 429.
- How 429s and limits are advertised: `retry_after_s`, `retry_after_mode` (both, seconds,
  ms, date, none) and `ratelimit_headers` (real, none, negative).
- Faults, drawn from a seeded RNG so runs are reproducible: `error_rate` (500),
  `reset_rate` (TCP RST mid-stream), `stall_rate`/`stall_seconds`, and stream faults:
  `truncate_rate` (the stream ends cleanly with no finish_reason, usage or [DONE]),
  `malformed_rate` (one broken SSE event, then a clean end), `empty_rate` (an empty
  answer), `length_rate` and `content_filter_rate` (the answer is cut, with that
  finish_reason), and `no_usage` (usage never sent). `fault_model` limits every injected
  fault (including `next_429`) to one model/deployment.
- Connections: idle keep-alive connections are closed with a FIN after
  `keepalive_timeout_s`, as uvicorn does.

What it received: with `request_log` > 0 the most recent chat requests are kept (model,
messages, traceparent, the status answered and whether the answer was completed, cut or
refused) and served at `GET /_simulator/requests`, so a test driving the simulator from
another process can prove which calls were made.
"""

import asyncio
import contextlib
import email.utils
import functools
import inspect
import json
import logging
import math
import random
import re
import socket
import ssl
import struct
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import h11

from pools.simulator.responders import (
    ChatRequest,
    Responder,
    count_prompt_tokens,
    default_responder,
    tokenize,
)
from pools.simulator.tls import SimulatorTLS

__all__ = [
    "FAULT_CHOICES",
    "FAULT_FIELDS",
    "QUOTA_DEFAULT_MAX_TOKENS",
    "LLMSimulator",
    "SimulatorConfig",
    "SimulatorStats",
]

logger = logging.getLogger(__name__)

_SERVER_NAME = "carlos-llm-simulator"
_SYSTEM_FINGERPRINT = "fp_carlos_sim"
_DEFAULT_MODELS = ("gpt-4o", "gpt-4o-mini")
_MODEL_CREATED = 1_715_367_049
_READ_SIZE = 65_536
_MAX_BODY_BYTES = 16 * 1024 * 1024
_MAX_BUFFERED_WHILE_RESPONDING = 1024 * 1024
_FAULT_AFTER_CHUNKS = 3
# Advertised limits when no capacity is configured: large, so clients never back off.
_UNLIMITED_REQUESTS = 10_000
_TOKENS_PER_REQUEST_SLOT = 30_000
_AZURE_CHAT_RE = re.compile(r"/openai/deployments/([^/]+)/chat/completions")
_MODEL_RE = re.compile(r"/v1/models/([^/]+)")
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_RESPONSE_FORMATS = frozenset({"text", "json_object", "json_schema"})
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
# Tokens the quota charges for a chat request that sets no max_tokens, as Azure does.
QUOTA_DEFAULT_MAX_TOKENS = 1000
_ORGANIZATION = "org-carlos-simulator"
_QUOTA_INCREASE_HINT = (
    "Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase "
    "the default rate limit."
)
_RATE_LIMIT_HINT = "Visit https://platform.openai.com/account/rate-limits to learn more."


@dataclass
class SimulatorConfig:
    """How the simulator behaves; mutable on a running server (tests flip fault rates live)."""

    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port (a restart then reuses the one picked)
    tls: bool = False  # self-signed certificate from an in-memory trustme CA
    ttft_ms: float = 0.0  # time to first token
    tokens_per_second: float = 0.0  # 0 = as fast as possible
    rtt_ms: float = 0.0  # per new connection (twice with TLS) and per request
    capacity: int = 0  # max concurrent chat requests, beyond -> 429 (0 = unlimited)
    retry_after_s: float = 1.0  # advertised on 429 (retry-after, retry-after-ms)
    error_rate: float = 0.0  # fraction of chat requests answered 500
    reset_rate: float = 0.0  # fraction of streams reset (RST) after a few chunks
    stall_rate: float = 0.0  # fraction of chat responses that stop mid-way ...
    stall_seconds: float = 30.0  # ... for this long
    api_key: str | None = None  # when set, other keys get 401 (Bearer or Azure api-key)
    deployments: tuple[str, ...] | None = None  # when set, other models/deployments get 404
    seed: int = 0  # fault draws come from random.Random(seed): runs are reproducible
    keepalive_timeout_s: float = 120.0  # idle connections are closed after this (0 = never)
    # Per (API key, model/deployment) quota over a sliding window, as Azure OpenAI deployments
    # have; 0 = off. TPM is charged on arrival: prompt + (max_tokens or the default).
    quota_rpm: int = 0
    quota_tpm: int = 0
    quota_window_s: float = 60.0
    ttft_per_request_ms: float = 0.0  # added to ttft_ms per other chat request in flight
    retry_after_mode: str = "both"  # on every 429: both | seconds | ms | date | none
    ratelimit_headers: str = "real"  # x-ratelimit-*: real | none | negative (-1 everywhere)
    next_429: int = 0  # the next N chat requests get 429 (counts down)
    fault_model: str = ""  # when set, injected faults hit only this model/deployment
    truncate_rate: float = 0.0  # streams that end cleanly after a few chunks, unfinished
    malformed_rate: float = 0.0  # streams that send one broken SSE event, then end
    empty_rate: float = 0.0  # answers with no content (finish_reason "stop")
    length_rate: float = 0.0  # answers cut at half, finish_reason "length"
    content_filter_rate: float = 0.0  # answers cut at a third, finish_reason "content_filter"
    no_usage: int = 0  # 1 = never send usage (streams ignore include_usage; usage: null)
    request_log: int = 0  # keep the last N chat requests for GET /_simulator/requests (0 = off)


# Settings that POST /_simulator/faults (and LLMSimulator.apply_faults) may change live,
# with the kind of value each accepts.
# Kinds: "rate" (a fraction 0..1), "number" (>= 0), "positive" (> 0), "count" (a whole
# number >= 0), "flag" (0 or 1), "choice" (one of FAULT_CHOICES[field]), "text" (a string).
FAULT_FIELDS: dict[str, str] = {
    "error_rate": "rate",
    "reset_rate": "rate",
    "stall_rate": "rate",
    "stall_seconds": "number",
    "capacity": "count",
    "ttft_ms": "number",
    "tokens_per_second": "number",
    "rtt_ms": "number",
    "retry_after_s": "number",
    "quota_rpm": "count",
    "quota_tpm": "count",
    "quota_window_s": "positive",
    "ttft_per_request_ms": "number",
    "retry_after_mode": "choice",
    "ratelimit_headers": "choice",
    "next_429": "count",
    "fault_model": "text",
    "truncate_rate": "rate",
    "malformed_rate": "rate",
    "empty_rate": "rate",
    "length_rate": "rate",
    "content_filter_rate": "rate",
    "no_usage": "flag",
    "keepalive_timeout_s": "number",
}

# The values each "choice" setting accepts.
FAULT_CHOICES: dict[str, tuple[str, ...]] = {
    "retry_after_mode": ("both", "seconds", "ms", "date", "none"),
    "ratelimit_headers": ("real", "none", "negative"),
}


def _clean_fault_value(key: str, value: Any) -> Any:
    """One live setting checked against its kind; raises ValueError saying what is wrong."""
    kind = FAULT_FIELDS[key]
    if kind == "choice":
        allowed = FAULT_CHOICES[key]
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {json.dumps(value)}")
        return value
    if kind == "text":
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {json.dumps(value)}")
        return value
    if kind == "flag":
        if value not in (0, 1):  # True and False are 1 and 0
            raise ValueError(f"{key} must be 0 or 1, got {json.dumps(value)}")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number, got {json.dumps(value)}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{key} must be a finite number >= 0, got {value}")
    if kind == "positive" and value == 0:
        raise ValueError(f"{key} must be greater than 0, got {value}")
    if kind == "rate" and value > 1:
        raise ValueError(f"{key} is a fraction and must be between 0 and 1, got {value}")
    if kind == "count":
        if value != int(value):
            raise ValueError(f"{key} must be a whole number, got {value}")
        return int(value)
    return float(value)


@dataclass
class SimulatorStats:
    """Exact wire-level counters; tests use them to prove connection reuse and fault counts."""

    connections_accepted: int = 0
    connections_open: int = 0
    requests_total: int = 0
    chat_requests: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    status_counts: dict[int, int] = field(default_factory=dict)
    resets: int = 0
    stalls: int = 0
    rate_limited: int = 0  # 429s sent, whatever the cause
    quota_rejections: int = 0  # 429s because a quota_rpm/quota_tpm window was full
    truncations: int = 0  # streams ended cleanly without finish_reason / [DONE]
    malformed: int = 0  # streams that carried a broken SSE event
    empties: int = 0  # empty answers sent
    idle_closes: int = 0  # keep-alive connections the server closed for being idle

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready copy (status codes become string keys, as JSON requires)."""
        data = asdict(self)
        data["status_counts"] = {str(k): v for k, v in sorted(self.status_counts.items())}
        return data


class _HTTPError(Exception):
    """An OpenAI-style error response, raised anywhere in request handling."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: list[tuple[str, str]] | None = None,
        close: bool = False,
        azure: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers or []
        self.close = close
        self.azure = azure  # Azure's shorter error shape: {"error": {"code", "message"}}

    def payload(self) -> dict[str, Any]:
        if self.azure:
            return {"error": {"code": self.code, "message": self.message}}
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class _PeerGone(Exception):
    """The client went away mid-response; stop work and drop the connection."""


class _ConnectionReset(Exception):
    """We deliberately reset the connection (fault injection)."""


class _Connection:
    """Per-connection state: the h11 machine plus bytes read while a response was running."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, epoch: int
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.SERVER)
        self.epoch = epoch
        self.control: bool | None = None  # decided by the first request
        self.buffered: list[bytes] = []
        self.buffered_bytes = 0
        self.eof = False
        self.peer_gone = asyncio.Event()
        self.aborted = False
        self.count_response = True
        # The quota windows the current request was checked against (for its headers).
        self.quota_windows: list[_QuotaWindow] = []
        # The request log entry of the current chat request (None: not a chat request, or
        # logging is off); its status and outcome are filled in as the answer goes out.
        self.log_entry: dict[str, Any] | None = None
        # While a read waits: its timeout and when the wait began, so a live change of
        # keepalive_timeout_s can move the deadline.
        self.read_timeout: tuple[asyncio.Timeout, float] | None = None


class _QuotaWindow:
    """A sliding-window log of (arrival time, tokens charged) for one (API key, model).

    A log rather than a token bucket, so the wait for room is exact: it is when the entries
    that must leave the window to make room do.
    """

    def __init__(self) -> None:
        self.entries: deque[tuple[float, int]] = deque()
        self.tokens = 0

    def prune(self, now: float, window: float) -> None:
        cutoff = now - window
        while self.entries and self.entries[0][0] <= cutoff:
            _, tokens = self.entries.popleft()
            self.tokens -= tokens

    def request_wait(self, now: float, window: float, limit: int) -> float:
        """Seconds until one more request fits under `limit` (0 = now)."""
        if limit <= 0 or len(self.entries) < limit:
            return 0.0
        # The oldest len - limit + 1 entries must leave the window first.
        return self.entries[len(self.entries) - limit][0] + window - now

    def token_wait(self, now: float, window: float, limit: int, cost: int) -> float:
        """Seconds until `cost` more tokens fit under `limit` (inf = never)."""
        if limit <= 0 or self.tokens + cost <= limit:
            return 0.0
        if cost > limit:
            return math.inf
        excess = self.tokens + cost - limit
        freed = 0
        for arrived, tokens in self.entries:
            freed += tokens
            if freed >= excess:
                return arrived + window - now
        return 0.0  # unreachable: freeing every entry always makes room

    def request_reset(self, now: float, window: float) -> float:
        """Seconds until the oldest entry leaves the window."""
        return self.entries[0][0] + window - now if self.entries else 0.0

    def token_reset(self, now: float, window: float) -> float:
        """Seconds until the oldest entry that holds tokens leaves the window."""
        for arrived, tokens in self.entries:
            if tokens:
                return arrived + window - now
        return 0.0


@dataclass
class _Request:
    """One parsed HTTP request as the router sees it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _sse(obj: Any) -> bytes:
    return b"data: " + _json_bytes(obj) + b"\n\n"


def _duration(seconds: float) -> str:
    """OpenAI's reset-header style: '250ms', '1s', '1.5s', '6m0s', '1h0m0s'."""
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    text = f"{rest / 1000:g}s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


class LLMSimulator:
    """An OpenAI/Azure-compatible chat server with latency and fault injection.

    Use as `async with LLMSimulator(SimulatorConfig(...)) as sim:` and point a client at
    `sim.base_url` (or `sim.root_url` for Azure clients).
    """

    def __init__(
        self, config: SimulatorConfig | None = None, responder: Responder | None = None
    ) -> None:
        self.config: SimulatorConfig = config if config is not None else SimulatorConfig()
        self.responder: Responder = responder if responder is not None else default_responder
        self.stats = SimulatorStats()
        self.port: int = 0
        self._server: asyncio.Server | None = None
        self._tls: SimulatorTLS | None = None
        self._generation = 0
        self._epoch = 0
        self._connections: dict[asyncio.Task[Any], _Connection] = {}
        for key in FAULT_FIELDS:
            _clean_fault_value(key, getattr(self.config, key))  # fail early on a bad config
        self._rng = random.Random(self.config.seed)
        # The stream-fault rolls come from their own generator, so the sequence of the
        # original three rolls per request (error, reset, stall) is what it always was.
        self._stream_rng = random.Random(f"{self.config.seed}:stream-faults")
        self._tokens_in_flight = 0
        self._quotas: dict[tuple[str, str], _QuotaWindow] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start_lock = asyncio.Lock()
        size = self.config.request_log
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"request_log must be a whole number >= 0, got {size!r}")
        self._request_log: deque[dict[str, Any]] | None = deque(maxlen=size) if size else None
        self._request_seq = 0  # never reset: seq numbers stay unique over the server's life
        self._request_log_dropped = 0

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start accepting connections; calling it on a running server is a no-op."""
        async with self._start_lock:
            if self._server is not None:
                return
            ssl_context: ssl.SSLContext | None = None
            if self.config.tls:
                if self._tls is None:
                    # Key generation is CPU work: keep it off the event loop.
                    self._tls = await asyncio.to_thread(SimulatorTLS, [self.config.host])
                ssl_context = self._tls.server_context()
            self._generation += 1
            self._loop = asyncio.get_running_loop()
            callback = functools.partial(self._on_connection, self._generation)
            port = self.config.port
            if port == 0 and self.port:
                # A restart keeps its URL so clients can reconnect, as to a restarted upstream.
                port = self.port
            try:
                self._server = await asyncio.start_server(
                    callback, self.config.host, port, ssl=ssl_context, reuse_address=True
                )
            except OSError:
                if port == self.config.port:
                    raise
                self._server = await asyncio.start_server(
                    callback, self.config.host, 0, ssl=ssl_context, reuse_address=True
                )
            self.port = self._server.sockets[0].getsockname()[1]
            logger.info("LLM simulator listening on %s", self.base_url)

    async def stop(self) -> None:
        """Close the listener and every connection, and wait until all handlers are done."""
        async with self._start_lock:
            server = self._server
            if server is None:
                return
            self._server = None
            self._generation += 1
            server.close()
            for task, conn in list(self._connections.items()):
                conn.aborted = True
                conn.writer.transport.abort()
                task.cancel()
            tasks = list(self._connections)
            if tasks:
                await asyncio.wait(tasks)
            # Also drop connections still in their TLS handshake (not yet ours to cancel).
            server.abort_clients()
            await server.wait_closed()
            # Let handler tasks that were scheduled but never ran see the new generation.
            await asyncio.sleep(0)

    async def __aenter__(self) -> "LLMSimulator":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    # --- addresses and TLS ---------------------------------------------------------------

    @property
    def _url_host(self) -> str:
        host = self.config.host
        if host in _WILDCARD_HOSTS:
            host = "127.0.0.1"
        return f"[{host}]" if ":" in host else host

    @property
    def root_url(self) -> str:
        """Scheme, host and port: what an Azure client takes as its endpoint."""
        scheme = "https" if self.config.tls else "http"
        return f"{scheme}://{self._url_host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, ending in /v1."""
        return f"{self.root_url}/v1"

    def _require_tls(self) -> SimulatorTLS:
        if self._tls is None:
            raise RuntimeError("TLS material exists only for a started simulator with tls=True")
        return self._tls

    def client_ssl_context(self) -> ssl.SSLContext:
        """An SSL context that trusts this simulator's private CA."""
        return self._require_tls().client_context()

    def ca_pem(self) -> bytes:
        """The CA certificate in PEM form."""
        return self._require_tls().ca_pem()

    def write_ca_pem(self, path: Any) -> None:
        """Write the CA certificate to a PEM file (a small, synchronous write)."""
        self._require_tls().write_ca_pem(path)

    # --- stats and runtime faults -------------------------------------------------------

    def reset_stats(self) -> None:
        """Zero the counters and empty the request log; live gauges (open connections,
        in-flight requests) are kept. Request seq numbers keep counting up."""
        self._epoch += 1
        if self._request_log is not None:
            self._request_log.clear()
        self._request_log_dropped = 0
        stats = self.stats  # reset in place: callers may hold a reference to it
        stats.connections_accepted = stats.requests_total = stats.chat_requests = 0
        stats.resets = stats.stalls = 0
        stats.rate_limited = stats.quota_rejections = 0
        stats.truncations = stats.malformed = stats.empties = stats.idle_closes = 0
        stats.peak_in_flight = stats.in_flight
        stats.status_counts.clear()

    def apply_faults(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Validate and apply fault/latency settings atomically; return the current values.

        Raises ValueError with an operator-readable message on unknown keys or bad values.
        """
        unknown = sorted(set(changes) - set(FAULT_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown setting(s): {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(FAULT_FIELDS))}"
            )
        clean = {key: _clean_fault_value(key, value) for key, value in changes.items()}
        for key, value in clean.items():
            setattr(self.config, key, value)
        if "keepalive_timeout_s" in clean:
            self._move_read_deadlines()
        return self.fault_settings()

    def _move_read_deadlines(self) -> None:
        """Apply a new keepalive_timeout_s to reads already waiting, not only to later ones."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not loop:  # called from another thread: let the server's loop do it
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._move_read_deadlines)
            return
        limit = self.config.keepalive_timeout_s
        for conn in self._connections.values():
            if conn.read_timeout is not None:
                timeout, started = conn.read_timeout
                if not timeout.expired():
                    timeout.reschedule(started + limit if limit > 0 else None)

    def fault_settings(self) -> dict[str, Any]:
        """The current values of every live-tunable setting."""
        return {key: getattr(self.config, key) for key in FAULT_FIELDS}

    # --- request log --------------------------------------------------------------------

    def requests_log(self, since: int = 0) -> list[dict[str, Any]]:
        """Copies of the logged chat requests with seq > `since`, oldest first.

        Copies, so a caller's snapshot does not change as in-flight requests end.
        """
        if self._request_log is None:
            return []
        return [dict(entry) for entry in self._request_log if entry["seq"] > since]

    @property
    def requests_dropped(self) -> int:
        """How many logged requests fell out of the bounded log since the last reset."""
        return self._request_log_dropped

    def _log_arrival(self, req: _Request, deployment: str | None) -> dict[str, Any] | None:
        """Log a chat request as it arrives, so one whose client vanishes still shows."""
        log = self._request_log
        if log is None:
            return None
        self._request_seq += 1
        entry: dict[str, Any] = {
            "seq": self._request_seq,
            "at": time.time(),
            "model": deployment,  # /v1 requests: the body's model, once the body is valid
            "deployment": deployment,
            "stream": None,  # bool once the body is valid
            "messages": None,
            "traceparent": req.headers.get("traceparent"),
            "status": None,  # set when the response starts
            "outcome": None,  # completed | cut | refused, set when the request ends
        }
        if len(log) == log.maxlen:
            self._request_log_dropped += 1
        log.append(entry)
        return entry

    @staticmethod
    def _log_completed(conn: _Connection) -> None:
        """The whole answer was written: for a stream, the final chunk and [DONE]."""
        if conn.log_entry is not None:
            conn.log_entry["outcome"] = "completed"

    @staticmethod
    def _log_end(conn: _Connection) -> None:
        """A request that was not completed: refused if answered with an error, else cut."""
        entry = conn.log_entry
        if entry is not None and entry["outcome"] is None:
            entry["outcome"] = "cut" if entry["status"] in (None, 200) else "refused"

    # --- connections --------------------------------------------------------------------

    async def _on_connection(
        self, generation: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One task per TCP connection, serving requests until close, idle timeout or stop."""
        if generation != self._generation or self._server is None:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        conn = _Connection(reader, writer, self._epoch)
        self._connections[task] = conn
        self.stats.connections_accepted += 1
        self.stats.connections_open += 1
        try:
            await self._serve(conn)
        except TimeoutError:
            pass  # a client that stopped sending mid-request: close it politely too
        except (_PeerGone, _ConnectionReset, ConnectionError):
            conn.aborted = True
        except ssl.SSLError as exc:
            logger.debug("TLS error on simulator connection: %s", exc)
            conn.aborted = True
        except Exception:
            logger.exception("LLM simulator connection handler failed")
            conn.aborted = True
        finally:
            self._connections.pop(task, None)
            if conn.control is not True:
                self.stats.connections_open -= 1
            if conn.aborted:
                writer.transport.abort()
            else:
                writer.close()

    def _mark_control(self, conn: _Connection) -> None:
        """Connections opened just to call /_simulator/* stay out of the counters.

        Otherwise observing the simulator (say, fetching stats from another process) would
        change the very connection counts a test is trying to prove.
        """
        conn.control = True
        self.stats.connections_open -= 1
        if conn.epoch == self._epoch:
            self.stats.connections_accepted -= 1

    async def _serve(self, conn: _Connection) -> None:
        rtt = self.config.rtt_ms / 1000
        if rtt > 0:
            # Emulated TCP handshake, plus the TLS one when serving HTTPS.
            await asyncio.sleep(rtt * (2 if self.config.tls else 1))
        while True:
            try:
                try:
                    event = await self._next_event(conn)
                except TimeoutError:
                    # Idle keep-alive connection: close it with a FIN, as uvicorn does.
                    idle = not conn.h11.trailing_data[0]  # not half-way through a request
                    if idle and conn.control is not True:
                        self.stats.idle_closes += 1
                    return
                if isinstance(event, h11.ConnectionClosed):
                    return
                if not isinstance(event, h11.Request):
                    return
                body = await self._read_body(conn)
            except h11.RemoteProtocolError as exc:
                await self._send_protocol_error(conn, exc)
                return
            except _HTTPError as err:
                await self._send_error(conn, err)
                return
            await self._handle_request(conn, event, body)
            if conn.aborted or conn.h11.our_state is not h11.DONE:
                return
            if conn.h11.their_state is not h11.DONE:
                return
            conn.h11.start_next_cycle()

    async def _receive(self, conn: _Connection) -> bytes:
        if conn.buffered:
            data = conn.buffered.pop(0)
            conn.buffered_bytes -= len(data)
            return data
        if conn.eof:
            return b""
        idle_limit = self.config.keepalive_timeout_s
        started = asyncio.get_running_loop().time()
        async with asyncio.timeout(idle_limit if idle_limit > 0 else None) as timeout:
            conn.read_timeout = (timeout, started)
            try:
                return await conn.reader.read(_READ_SIZE)
            finally:
                conn.read_timeout = None

    async def _next_event(self, conn: _Connection) -> Any:
        while True:
            event = conn.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            if conn.h11.they_are_waiting_for_100_continue:
                await self._send(conn, h11.InformationalResponse(status_code=100, headers=[]))
            data = await self._receive(conn)
            if not data:
                conn.eof = True
            conn.h11.receive_data(data)

    async def _read_body(self, conn: _Connection) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event(conn)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > _MAX_BODY_BYTES:
                    raise _HTTPError(
                        413, "Request body too large.", code="request_too_large", close=True
                    )
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise h11.RemoteProtocolError("connection closed mid-request")

    async def _watch_peer(self, conn: _Connection) -> None:
        """While a response runs, notice the client leaving (and keep any pipelined bytes)."""
        try:
            while not conn.eof and conn.buffered_bytes < _MAX_BUFFERED_WHILE_RESPONDING:
                data = await conn.reader.read(_READ_SIZE)
                if not data:
                    conn.eof = True
                    break
                conn.buffered.append(data)
                conn.buffered_bytes += len(data)
        except (ConnectionError, ssl.SSLError):
            conn.eof = True
        if conn.eof:
            conn.peer_gone.set()

    # --- writing ------------------------------------------------------------------------

    async def _send(self, conn: _Connection, event: Any) -> None:
        if conn.peer_gone.is_set() or conn.writer.transport.is_closing():
            raise _PeerGone
        data = conn.h11.send(event)
        if data:
            conn.writer.write(data)
            await conn.writer.drain()

    def _base_headers(self) -> list[tuple[str, str]]:
        return [
            ("date", email.utils.formatdate(usegmt=True)),
            ("server", _SERVER_NAME),
            ("x-request-id", f"req_{uuid.uuid4().hex}"),
        ]

    async def _start_response(
        self, conn: _Connection, status: int, headers: list[tuple[str, str]]
    ) -> None:
        if conn.log_entry is not None:
            conn.log_entry["status"] = status
        if conn.count_response:
            counts = self.stats.status_counts
            counts[status] = counts.get(status, 0) + 1
            if status == 429:
                self.stats.rate_limited += 1
            if status < 300:
                # Every successful API response advertises limits, like OpenAI's do.
                headers = [*headers, *self._ratelimit_headers(conn)]
        await self._send(
            conn, h11.Response(status_code=status, headers=self._base_headers() + headers)
        )

    async def _send_json(
        self,
        conn: _Connection,
        status: int,
        obj: Any,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        body = _json_bytes(obj)
        await self._start_response(
            conn,
            status,
            [
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
                *(headers or []),
            ],
        )
        await self._send(conn, h11.Data(data=body))
        await self._send(conn, h11.EndOfMessage())

    async def _send_error(self, conn: _Connection, err: _HTTPError) -> None:
        # IDLE happens when the request itself was unparseable (h11 still lets us answer).
        if conn.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            conn.aborted = True
            return
        headers = list(err.headers)
        if err.close:
            headers.append(("connection", "close"))
        await self._send_json(conn, err.status, err.payload(), headers)

    async def _send_protocol_error(self, conn: _Connection, exc: h11.RemoteProtocolError) -> None:
        """Garbage on the wire gets a 400 (or h11's hint) and the connection is closed."""
        if conn.control is None:
            conn.control = False
        self.stats.requests_total += 1
        if conn.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            conn.aborted = True
            return
        err = _HTTPError(
            exc.error_status_hint,
            f"Malformed HTTP request: {exc}",
            code="bad_request",
            close=True,
        )
        with contextlib.suppress(h11.LocalProtocolError):
            await self._send_error(conn, err)

    # --- request handling ---------------------------------------------------------------

    async def _handle_request(self, conn: _Connection, event: h11.Request, body: bytes) -> None:
        target = event.target.decode("latin-1")
        parts = urlsplit(target)
        request = _Request(
            method=event.method.decode("ascii", "replace").upper(),
            path=parts.path,
            query=parse_qs(parts.query),
            headers={k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers},
            body=body,
        )
        control = request.path.startswith("/_simulator/")
        if conn.control is None and control:
            self._mark_control(conn)
        elif conn.control is None:
            conn.control = False
        conn.count_response = not control
        conn.quota_windows = []
        conn.log_entry = None
        if not control:
            self.stats.requests_total += 1

        watcher = asyncio.create_task(self._watch_peer(conn))
        try:
            try:
                await self._route(conn, request)
            except _HTTPError as err:
                await self._send_error(conn, err)
            except (_PeerGone, _ConnectionReset, ConnectionError, ssl.SSLError):
                raise
            except Exception as exc:
                logger.exception("LLM simulator failed handling %s %s", request.method, target)
                await self._send_error(
                    conn,
                    _HTTPError(
                        500,
                        f"The simulator failed while processing your request: {exc}",
                        type_="server_error",
                        code="server_error",
                        close=True,
                    ),
                )
        finally:
            self._log_end(conn)
            watcher.cancel()
            await asyncio.wait([watcher])

    async def _route(self, conn: _Connection, req: _Request) -> None:
        path = req.path
        if path.startswith("/_simulator/"):
            await self._control(conn, req)
            return
        rtt = self.config.rtt_ms / 1000
        if rtt > 0:
            await self._pause(conn, rtt)
        if path == "/v1/chat/completions":
            self._allow(req, "POST")
            await self._chat(conn, req, deployment=None)
        elif match := _AZURE_CHAT_RE.fullmatch(path):
            self._allow(req, "POST")
            await self._chat(conn, req, deployment=unquote(match[1]))
        elif path in ("/v1/models", "/openai/models"):
            self._allow(req, "GET")
            self._check_auth(req)
            if path.startswith("/openai/"):
                self._require_api_version(req)
            self._charge_quota(conn, req, None, 0, "Models_List")
            await self._send_json(
                conn, 200, {"object": "list", "data": [_model(m) for m in self._models()]}
            )
        elif match := _MODEL_RE.fullmatch(path):
            self._allow(req, "GET")
            self._check_auth(req)
            model = unquote(match[1])
            if model not in self._models():
                raise _model_not_found(model)
            self._charge_quota(conn, req, model, 0, "Models_Get")
            await self._send_json(conn, 200, _model(model))
        else:
            raise _HTTPError(
                404,
                f"Unknown request URL: {req.method} {path}. Please check the URL for typos.",
                code="unknown_url",
            )

    @staticmethod
    def _allow(req: _Request, method: str) -> None:
        if req.method != method:
            raise _HTTPError(
                405,
                f"Method {req.method} not allowed for {req.path}; use {method}.",
                code="method_not_allowed",
                headers=[("allow", method)],
            )

    def _check_auth(self, req: _Request) -> None:
        expected = self.config.api_key
        if expected is None:
            return
        auth = req.headers.get("authorization", "")
        bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        azure_key = req.headers.get("api-key")
        if expected in (bearer, azure_key):
            return
        given = bearer or azure_key
        if not given:
            message = (
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), "
                "or in an api-key header."
            )
        else:
            shown = given[:3] + "*" * 8 + given[-4:] if len(given) > 10 else "*" * 8
            message = f"Incorrect API key provided: {shown}."
        raise _HTTPError(401, message, code="invalid_api_key")

    @staticmethod
    def _require_api_version(req: _Request) -> None:
        if not req.query.get("api-version", [""])[0]:
            raise _HTTPError(
                400,
                "Missing required query parameter 'api-version' (e.g. ?api-version=2024-10-21).",
                code="missing_api_version",
                param="api-version",
            )

    def _models(self) -> tuple[str, ...]:
        return self.config.deployments if self.config.deployments is not None else _DEFAULT_MODELS

    # --- control plane ------------------------------------------------------------------

    async def _control(self, conn: _Connection, req: _Request) -> None:
        if req.path == "/_simulator/stats":
            self._allow(req, "GET")
            await self._send_json(conn, 200, self.stats.as_dict())
        elif req.path == "/_simulator/faults":
            if req.method == "GET":
                await self._send_json(conn, 200, self.fault_settings())
                return
            self._allow(req, "POST")
            changes = _parse_json_object(req.body)
            try:
                settings = self.apply_faults(changes)
            except ValueError as exc:
                raise _HTTPError(400, str(exc), code="invalid_fault_settings") from exc
            await self._send_json(conn, 200, settings)
        elif req.path == "/_simulator/requests":
            self._allow(req, "GET")
            since = req.query.get("since", ["0"])[0]
            try:
                after = int(since)
            except ValueError as exc:
                raise _bad_param(
                    "since", f"'since' must be a whole number, got {since!r}."
                ) from exc
            await self._send_json(
                conn,
                200,
                {
                    "enabled": self._request_log is not None,
                    "requests": self.requests_log(after),
                    "dropped": self._request_log_dropped,
                },
            )
        elif req.path == "/_simulator/reset":
            self._allow(req, "POST")
            self.reset_stats()
            await self._send_json(conn, 200, self.stats.as_dict())
        else:
            raise _HTTPError(
                404,
                f"Unknown simulator endpoint {req.path}; try /_simulator/stats, "
                "/_simulator/faults, /_simulator/requests or /_simulator/reset.",
                code="unknown_url",
            )

    # --- chat completions ---------------------------------------------------------------

    def _ratelimit_headers(
        self,
        conn: _Connection,
        *,
        exhausted: Sequence[str] = (),
        resets: Mapping[str, float] | None = None,
    ) -> list[tuple[str, str]]:
        """x-ratelimit-* headers: the quota's real numbers when one is set, else capacity's.

        `exhausted` kinds ("requests", "tokens") are advertised with 0 remaining; `resets`
        overrides the reset time of a kind (the exact wait of a 429).
        """
        cfg = self.config
        if cfg.ratelimit_headers == "none":
            return []
        limit_requests = cfg.capacity if cfg.capacity > 0 else _UNLIMITED_REQUESTS
        limit_tokens = limit_requests * _TOKENS_PER_REQUEST_SLOT
        remaining_requests = max(0, limit_requests - self.stats.in_flight)
        remaining_tokens = max(0, limit_tokens - self._tokens_in_flight)
        reset_requests = reset_tokens = max(cfg.retry_after_s, 0.001)
        if conn.quota_windows:
            # A models list is checked against several windows: show the fullest.
            window = max(conn.quota_windows, key=lambda w: (len(w.entries), w.tokens))
            now = asyncio.get_running_loop().time()
            window.prune(now, cfg.quota_window_s)
            if cfg.quota_rpm > 0:
                limit_requests = cfg.quota_rpm
                remaining_requests = max(0, cfg.quota_rpm - len(window.entries))
                reset_requests = window.request_reset(now, cfg.quota_window_s)
            if cfg.quota_tpm > 0:
                limit_tokens = cfg.quota_tpm
                remaining_tokens = max(0, cfg.quota_tpm - window.tokens)
                reset_tokens = window.token_reset(now, cfg.quota_window_s)
        if "requests" in exhausted:
            remaining_requests = 0
        if "tokens" in exhausted:
            remaining_tokens = 0
        resets = resets or {}
        reset_requests = resets.get("requests", reset_requests)
        reset_tokens = resets.get("tokens", reset_tokens)
        numbers = [limit_requests, remaining_requests, limit_tokens, remaining_tokens]
        if cfg.ratelimit_headers == "negative":
            numbers = [-1] * 4
        return [
            ("x-ratelimit-limit-requests", str(numbers[0])),
            ("x-ratelimit-remaining-requests", str(numbers[1])),
            ("x-ratelimit-reset-requests", _duration(reset_requests)),
            ("x-ratelimit-limit-tokens", str(numbers[2])),
            ("x-ratelimit-remaining-tokens", str(numbers[3])),
            ("x-ratelimit-reset-tokens", _duration(reset_tokens)),
        ]

    def _retry_after_headers(self, seconds: float, ms: int | None = None) -> list[tuple[str, str]]:
        """retry-after / retry-after-ms as retry_after_mode says (ms defaults to round(s))."""
        seconds = max(seconds, 0.0)
        if ms is None:
            ms = round(seconds * 1000)
        mode = self.config.retry_after_mode
        whole = ("retry-after", str(math.ceil(seconds)))
        millis = ("retry-after-ms", str(ms))
        if mode == "both":
            return [whole, millis]
        if mode == "seconds":
            return [whole]
        if mode == "ms":
            return [millis]
        if mode == "date":
            at = math.ceil(time.time() + seconds)  # rounded up: never earlier than the wait
            return [("retry-after", email.utils.formatdate(at, usegmt=True))]
        return []

    def _too_many_requests(self, conn: _Connection) -> _HTTPError:
        retry_after = max(self.config.retry_after_s, 0.0)
        headers = [
            *self._retry_after_headers(retry_after),
            *self._ratelimit_headers(conn, exhausted=("requests",)),
        ]
        return _HTTPError(
            429,
            f"Rate limit reached: the simulator is configured for {self.config.capacity} "
            f"concurrent request(s). Please try again in {retry_after:g}s.",
            type_="requests",
            code="rate_limit_exceeded",
            headers=headers,
        )

    def _rate_limit_error(
        self,
        req: _Request,
        *,
        operation: str,
        model: str | None,
        kind: str,
        wait: float,
        headers: list[tuple[str, str]],
        detail: str,
    ) -> _HTTPError:
        """A 429 in the style of the path: Azure's for /openai/..., OpenAI's for /v1/...."""
        if req.path.startswith("/openai/"):
            seconds = math.ceil(wait)
            version = req.query.get("api-version", [""])[0]
            limit = "call" if kind == "requests" else "token"
            message = (
                f"Requests to the {operation} Operation under Azure OpenAI API version "
                f"{version} have exceeded {limit} rate limit of your current OpenAI S0 pricing "
                f"tier. Please retry after {seconds} second{'' if seconds == 1 else 's'}. "
                f"{_QUOTA_INCREASE_HINT}"
            )
            return _HTTPError(429, message, code="429", headers=headers, azure=True)
        return _HTTPError(
            429,
            f"{detail} {_RATE_LIMIT_HINT}",
            type_=kind,
            code="rate_limit_exceeded",
            headers=headers,
        )

    def _scripted_429(self, conn: _Connection, req: _Request, model: str) -> _HTTPError:
        wait = max(self.config.retry_after_s, 0.0)
        headers = [
            *self._retry_after_headers(wait),
            *self._ratelimit_headers(conn, exhausted=("requests",)),
        ]
        return self._rate_limit_error(
            req,
            operation="ChatCompletions_Create",
            model=model,
            kind="requests",
            wait=wait,
            headers=headers,
            detail=f"Rate limit reached for {model} in organization {_ORGANIZATION} on "
            f"requests per min (RPM). Please try again in {_duration(wait)}.",
        )

    def _check_quota(
        self, conn: _Connection, req: _Request, model: str | None, cost: int, operation: str
    ) -> list[_QuotaWindow]:
        """The quota windows this request is charged to; raises the 429 if one is full.

        Quotas are per (API key presented, model/deployment). A request naming no model
        (a models list) is counted against every model of that key: the ones listed and any
        it has used.
        """
        cfg = self.config
        if cfg.quota_rpm <= 0 and cfg.quota_tpm <= 0:
            return []
        key = _presented_key(req)
        if model is None:
            models = sorted({*self._models(), *(m for k, m in self._quotas if k == key)})
        else:
            models = [model]
        now = asyncio.get_running_loop().time()
        span = cfg.quota_window_s
        windows = []
        for name in models:
            window = self._quotas.setdefault((key, name), _QuotaWindow())
            window.prune(now, span)
            windows.append(window)
        conn.quota_windows = windows
        worst: tuple[float, float, _QuotaWindow, str] | None = None
        for window, name in zip(windows, models, strict=True):
            request_wait = window.request_wait(now, span, cfg.quota_rpm)
            token_wait = window.token_wait(now, span, cfg.quota_tpm, cost)
            if (request_wait > 0 or token_wait > 0) and (
                worst is None or max(request_wait, token_wait) > max(worst[0], worst[1])
            ):
                worst = (request_wait, token_wait, window, name)
        if worst is None:
            return windows

        request_wait, token_wait, window, name = worst
        self.stats.quota_rejections += 1
        conn.quota_windows = [window]
        kind = "requests" if request_wait >= token_wait else "tokens"
        too_large = math.isinf(token_wait)
        # A request larger than the whole TPM never fits; advertise the full window.
        wait = span if too_large else max(request_wait, token_wait)
        ms = math.ceil(wait * 1000)
        exhausted = [k for k, w in (("requests", request_wait), ("tokens", token_wait)) if w > 0]
        headers = [
            *self._retry_after_headers(ms / 1000, ms),
            *self._ratelimit_headers(
                conn,
                exhausted=exhausted,
                resets={
                    k: (span if math.isinf(w) else w)
                    for k, w in (("requests", request_wait), ("tokens", token_wait))
                    if w > 0
                },
            ),
        ]
        subject = model if model is not None else "models"
        if too_large:
            detail = (
                f"Request too large for {subject} in organization {_ORGANIZATION} on tokens "
                f"per min (TPM): Limit {cfg.quota_tpm}, Requested {cost}. The input or output "
                "tokens must be reduced in order to run successfully."
            )
        elif kind == "requests":
            detail = (
                f"Rate limit reached for {subject} in organization {_ORGANIZATION} on requests "
                f"per min (RPM): Limit {cfg.quota_rpm}, Used {len(window.entries)}, "
                f"Requested 1. Please try again in {_duration(wait)}."
            )
        else:
            detail = (
                f"Rate limit reached for {subject} in organization {_ORGANIZATION} on tokens "
                f"per min (TPM): Limit {cfg.quota_tpm}, Used {window.tokens}, Requested "
                f"{cost}. Please try again in {_duration(wait)}."
            )
        raise self._rate_limit_error(
            req,
            operation=operation,
            model=name,
            kind=kind,
            wait=wait,
            headers=headers,
            detail=detail,
        )

    @staticmethod
    def _consume_quota(windows: list[_QuotaWindow], cost: int) -> None:
        now = asyncio.get_running_loop().time()
        for window in windows:
            window.entries.append((now, cost))
            window.tokens += cost

    def _charge_quota(
        self, conn: _Connection, req: _Request, model: str | None, cost: int, operation: str
    ) -> None:
        self._consume_quota(self._check_quota(conn, req, model, cost, operation), cost)

    def _faults_apply_to(self, model: str) -> bool:
        target = self.config.fault_model
        return not target or model == target

    async def _chat(self, conn: _Connection, req: _Request, deployment: str | None) -> None:
        self.stats.chat_requests += 1
        conn.log_entry = entry = self._log_arrival(req, deployment)
        self._check_auth(req)
        if deployment is not None:
            self._require_api_version(req)
        request = _chat_request(_parse_json_object(req.body), deployment)
        if entry is not None:
            entry.update(model=request.model, stream=request.stream, messages=request.messages)
        deployments = self.config.deployments
        if deployments is not None and request.model not in deployments:
            if deployment is not None:
                raise _HTTPError(
                    404,
                    "The API deployment for this resource does not exist. If you created the "
                    "deployment within the last 5 minutes, please wait a moment and try again.",
                    code="DeploymentNotFound",
                )
            raise _model_not_found(request.model)
        cfg = self.config
        faulty = self._faults_apply_to(request.model)
        if faulty and cfg.next_429 > 0:
            cfg.next_429 -= 1
            raise self._scripted_429(conn, req, request.model)
        prompt_tokens = count_prompt_tokens(request.messages)
        charge = prompt_tokens + (request.max_tokens or QUOTA_DEFAULT_MAX_TOKENS)
        windows = self._check_quota(conn, req, request.model, charge, "ChatCompletions_Create")
        capacity = cfg.capacity
        if capacity > 0 and self.stats.in_flight >= capacity:
            raise self._too_many_requests(conn)
        self._consume_quota(windows, charge)

        reserved = prompt_tokens + (request.max_tokens or 256)
        others_in_flight = self.stats.in_flight
        self.stats.in_flight += 1
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.stats.in_flight)
        self._tokens_in_flight += reserved
        try:
            # Always three draws per admitted request, so the fault sequence for a given
            # seed does not depend on which rates happen to be set; the stream-fault rolls
            # come from their own generator, always five of them.
            error_roll, reset_roll, stall_roll = (self._rng.random() for _ in range(3))
            truncate_roll, malformed_roll, empty_roll, length_roll, filter_roll = (
                self._stream_rng.random() for _ in range(5)
            )
            if faulty and error_roll < cfg.error_rate:
                raise _HTTPError(
                    500,
                    "The server had an error while processing your request. Sorry about that!",
                    type_="server_error",
                    code="server_error",
                )
            text = await self._respond(request)
            tokens = tokenize(text)
            finish_reason = "stop"
            if request.max_tokens is not None and len(tokens) > request.max_tokens:
                tokens = tokens[: request.max_tokens]
                finish_reason = "length"
            # At most one shape per response; when several rolls hit, the first one wins.
            shape = "normal"
            if faulty:
                if request.stream and malformed_roll < cfg.malformed_rate:
                    shape = "malformed"
                elif request.stream and truncate_roll < cfg.truncate_rate:
                    shape = "truncate"
                elif empty_roll < cfg.empty_rate:
                    shape = "empty"
                    tokens, finish_reason = [], "stop"
                elif filter_roll < cfg.content_filter_rate:
                    shape = "content_filter"
                    tokens, finish_reason = tokens[: len(tokens) // 3], "content_filter"
                elif length_roll < cfg.length_rate:
                    shape = "length"
                    tokens, finish_reason = tokens[: len(tokens) // 2], "length"
            no_usage = faulty and bool(cfg.no_usage)
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens),
                "total_tokens": prompt_tokens + len(tokens),
            }
            plan = _ResponsePlan(
                request=request,
                tokens=tokens,
                finish_reason=finish_reason,
                usage=None if no_usage else usage,
                reset=faulty and request.stream and reset_roll < cfg.reset_rate,
                stall=faulty and stall_roll < cfg.stall_rate,
                ttft_s=(cfg.ttft_ms + cfg.ttft_per_request_ms * others_in_flight) / 1000,
                shape=shape,
                include_usage=request.include_usage and not no_usage,
            )
            if shape == "empty":
                self.stats.empties += 1
            if request.stream:
                await self._stream(conn, plan)
            else:
                await self._complete(conn, plan)
        finally:
            self.stats.in_flight -= 1
            self._tokens_in_flight -= reserved

    async def _respond(self, request: ChatRequest) -> str:
        result: Any = self.responder(request)
        if inspect.isawaitable(result):
            result = await result
        if not isinstance(result, str):
            raise TypeError(f"responder returned {type(result).__name__}, expected str")
        return result

    async def _pause(self, conn: _Connection, seconds: float) -> None:
        """Sleep, but give up as soon as the client disconnects."""
        if conn.peer_gone.is_set():
            raise _PeerGone
        if seconds <= 0:
            return
        try:
            async with asyncio.timeout(seconds):
                await conn.peer_gone.wait()
        except TimeoutError:
            return
        raise _PeerGone

    async def _reset(self, conn: _Connection) -> None:
        """Abort with SO_LINGER 0 so the kernel sends RST, as a crashed upstream would."""
        sock = conn.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.aborted = True
        conn.writer.transport.abort()
        self.stats.resets += 1
        raise _ConnectionReset

    async def _stall(self, conn: _Connection) -> None:
        self.stats.stalls += 1
        await self._pause(conn, self.config.stall_seconds)

    async def _complete(self, conn: _Connection, plan: "_ResponsePlan") -> None:
        """Non-streaming: wait the whole generation time, then send one chat.completion."""
        cfg = self.config
        generation = plan.ttft_s
        if cfg.tokens_per_second > 0:
            generation += len(plan.tokens) / cfg.tokens_per_second
        await self._pause(conn, generation)
        request = plan.request
        body = _json_bytes(
            {
                "id": plan.completion_id,
                "object": "chat.completion",
                "created": plan.created,
                "model": request.model,
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
                "system_fingerprint": _SYSTEM_FINGERPRINT,
            }
        )
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("openai-processing-ms", str(round(generation * 1000))),
        ]
        await self._start_response(conn, 200, headers)
        if plan.stall:
            half = len(body) // 2
            await self._send(conn, h11.Data(data=body[:half]))
            await self._stall(conn)
            body = body[half:]
        await self._send(conn, h11.Data(data=body))
        await self._send(conn, h11.EndOfMessage())
        self._log_completed(conn)

    async def _stream(self, conn: _Connection, plan: "_ResponsePlan") -> None:
        """SSE stream: one chunk per token, each flushed on its own schedule."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        await self._start_response(
            conn,
            200,
            [
                ("content-type", "text/event-stream; charset=utf-8"),
                ("cache-control", "no-cache"),
            ],
        )
        request = plan.request
        first_at = loop.time() + plan.ttft_s
        if plan.shape == "malformed":
            # One event cut off mid-JSON, then a clean end of the HTTP response.
            await self._pause(conn, first_at - loop.time())
            self.stats.malformed += 1
            broken = f'data: {{"id":"{plan.completion_id}","object":"chat.comp\n\n'
            await self._send(conn, h11.Data(data=broken.encode()))
            await self._send(conn, h11.EndOfMessage())
            return
        base = {
            "id": plan.completion_id,
            "object": "chat.completion.chunk",
            "created": plan.created,
            "model": request.model,
            "system_fingerprint": _SYSTEM_FINGERPRINT,
        }
        usage_field = {"usage": None} if plan.include_usage else {}
        interval = 1 / cfg.tokens_per_second if cfg.tokens_per_second > 0 else 0.0
        fault_at = min(_FAULT_AFTER_CHUNKS, max(1, len(plan.tokens) // 2))
        truncate = plan.shape == "truncate"
        fault_done = False
        chunks = plan.chunks()
        for index, (delta, finish_reason) in enumerate(chunks):
            if index == fault_at and (plan.reset or plan.stall):
                fault_done = True
                if plan.reset:
                    await self._pause(conn, first_at + index * interval - loop.time())
                    await self._reset(conn)
                stall_started = loop.time()
                await self._stall(conn)
                first_at += loop.time() - stall_started
            if truncate and index == fault_at:
                break
            await self._pause(conn, first_at + index * interval - loop.time())
            choice = {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": None if truncate else finish_reason,
            }
            if finish_reason is not None and not truncate:
                choice.update(plan.filter_results())
            await self._send(
                conn, h11.Data(data=_sse({**base, "choices": [choice], **usage_field}))
            )
        if not fault_done and plan.reset:
            await self._reset(conn)
        if not fault_done and plan.stall:
            await self._stall(conn)
        if truncate:
            # Cut: the HTTP response ends cleanly, but no finish_reason, usage or [DONE].
            self.stats.truncations += 1
            await self._send(conn, h11.EndOfMessage())
            return
        if plan.include_usage:
            await self._send(
                conn, h11.Data(data=_sse({**base, "choices": [], "usage": plan.usage}))
            )
        await self._send(conn, h11.Data(data=b"data: [DONE]\n\n"))
        await self._send(conn, h11.EndOfMessage())
        self._log_completed(conn)


def _presented_key(req: _Request) -> str:
    """The API key a request presents (Azure's api-key, else the Bearer token, else '')."""
    azure_key = req.headers.get("api-key")
    if azure_key:
        return azure_key
    auth = req.headers.get("authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else auth


# What Azure attaches to a choice whose output its content filter stopped.
_FILTERED = {
    "hate": {"filtered": False, "severity": "safe"},
    "self_harm": {"filtered": False, "severity": "safe"},
    "sexual": {"filtered": False, "severity": "safe"},
    "violence": {"filtered": True, "severity": "medium"},
}


@dataclass
class _ResponsePlan:
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


def _model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": _MODEL_CREATED, "owned_by": "carlos"}


def _model_not_found(model: str) -> _HTTPError:
    return _HTTPError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )


def _parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _HTTPError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)",
            code="invalid_json",
        ) from exc
    if not isinstance(payload, dict):
        raise _HTTPError(400, "The request body must be a JSON object.", code="invalid_json")
    return payload


def _bad_param(param: str, message: str, code: str = "invalid_value") -> _HTTPError:
    return _HTTPError(400, message, code=code, param=param)


def _chat_request(body: dict[str, Any], deployment: str | None) -> ChatRequest:
    """Validate a chat-completions body the way OpenAI does for the fields we model."""
    model = body.get("model")
    if deployment is None:
        if model is None:
            raise _bad_param(
                "model", "Missing required parameter: 'model'.", "missing_required_parameter"
            )
        if not isinstance(model, str) or not model:
            raise _bad_param("model", "'model' must be a non-empty string.", "invalid_type")
    messages = body.get("messages")
    if messages is None:
        raise _bad_param(
            "messages", "Missing required parameter: 'messages'.", "missing_required_parameter"
        )
    if not isinstance(messages, list) or not messages:
        raise _bad_param("messages", "'messages' must be a non-empty array.", "invalid_type")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad_param(f"messages[{i}]", f"messages[{i}] must be an object.", "invalid_type")
        if message.get("role") not in _ROLES:
            raise _bad_param(
                f"messages[{i}].role",
                f"Invalid value for messages[{i}].role: {json.dumps(message.get('role'))}. "
                f"Supported values are: {', '.join(sorted(_ROLES))}.",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _bad_param(
                f"messages[{i}].content",
                f"messages[{i}].content must be a string or an array of parts.",
                "invalid_type",
            )

    temperature = body.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise _bad_param("temperature", "'temperature' must be a number.", "invalid_type")
        if not 0 <= temperature <= 2:
            raise _bad_param(
                "temperature",
                f"{temperature} is not a valid temperature; it must be between 0 and 2.",
            )
        temperature = float(temperature)

    max_tokens: int | None = None
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _bad_param(key, f"'{key}' must be an integer >= 1.")
        max_tokens = value
        break

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad_param("stream", "'stream' must be a boolean.", "invalid_type")
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not stream:
            raise _bad_param(
                "stream_options",
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            )
        if not isinstance(stream_options, dict):
            raise _bad_param("stream_options", "'stream_options' must be an object.")
    include_usage = bool((stream_options or {}).get("include_usage", False))

    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict)
        or response_format.get("type") not in _RESPONSE_FORMATS
    ):
        raise _bad_param(
            "response_format",
            "'response_format' must be an object whose type is one of: "
            f"{', '.join(sorted(_RESPONSE_FORMATS))}.",
        )

    return ChatRequest(
        model=deployment if deployment is not None else model,
        messages=messages,
        temperature=temperature,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=include_usage,
        response_format=response_format,
        deployment=deployment,
        body=body,
    )
