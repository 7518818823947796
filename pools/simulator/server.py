"""An offline, OpenAI-compatible chat-completions server in plain asyncio + h11.

Why it exists: Carlos's connection pools must be tested for reuse, pacing, back-pressure and
fault handling without a network or a real model. Driving HTTP/1.1 ourselves through h11
gives exact control over every connection (keep-alive, resets, stalls), and the counters in
`SimulatorStats` let tests prove what the client side did on the wire.
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
from collections.abc import Mapping
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

__all__ = ["FAULT_FIELDS", "LLMSimulator", "SimulatorConfig", "SimulatorStats"]

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


# Settings that POST /_simulator/faults (and LLMSimulator.apply_faults) may change live,
# with the kind of value each accepts.
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
}


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
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers or []
        self.close = close

    def payload(self) -> dict[str, Any]:
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
    """OpenAI's reset-header style: '250ms', '1s', '1.5s'."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


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
        self._rng = random.Random(self.config.seed)
        self._tokens_in_flight = 0
        self._start_lock = asyncio.Lock()

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
        """Zero the counters; live gauges (open connections, in-flight requests) are kept."""
        self._epoch += 1
        stats = self.stats  # reset in place: callers may hold a reference to it
        stats.connections_accepted = stats.requests_total = stats.chat_requests = 0
        stats.resets = stats.stalls = 0
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
        clean: dict[str, float | int] = {}
        for key, value in changes.items():
            kind = FAULT_FIELDS[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{key} must be a number, got {json.dumps(value)}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{key} must be a finite number >= 0, got {value}")
            if kind == "rate" and value > 1:
                raise ValueError(f"{key} is a fraction and must be between 0 and 1, got {value}")
            if kind == "count":
                if value != int(value):
                    raise ValueError(f"{key} must be a whole number, got {value}")
                value = int(value)
            else:
                value = float(value)
            clean[key] = value
        for key, value in clean.items():
            setattr(self.config, key, value)
        return self.fault_settings()

    def fault_settings(self) -> dict[str, Any]:
        """The current values of every live-tunable setting."""
        return {key: getattr(self.config, key) for key in FAULT_FIELDS}

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
            pass  # idle keep-alive connection: close it politely
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
                event = await self._next_event(conn)
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
        async with asyncio.timeout(idle_limit if idle_limit > 0 else None):
            return await conn.reader.read(_READ_SIZE)

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
        if conn.count_response:
            counts = self.stats.status_counts
            counts[status] = counts.get(status, 0) + 1
            if status < 300:
                # Every successful API response advertises limits, like OpenAI's do.
                headers = [*headers, *self._ratelimit_headers()]
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
            await self._send_json(
                conn, 200, {"object": "list", "data": [_model(m) for m in self._models()]}
            )
        elif match := _MODEL_RE.fullmatch(path):
            self._allow(req, "GET")
            self._check_auth(req)
            model = unquote(match[1])
            if model not in self._models():
                raise _model_not_found(model)
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
        elif req.path == "/_simulator/reset":
            self._allow(req, "POST")
            self.reset_stats()
            await self._send_json(conn, 200, self.stats.as_dict())
        else:
            raise _HTTPError(
                404,
                f"Unknown simulator endpoint {req.path}; "
                "try /_simulator/stats, /_simulator/faults or /_simulator/reset.",
                code="unknown_url",
            )

    # --- chat completions ---------------------------------------------------------------

    def _ratelimit_headers(self, *, exhausted: bool = False) -> list[tuple[str, str]]:
        cfg = self.config
        limit_requests = cfg.capacity if cfg.capacity > 0 else _UNLIMITED_REQUESTS
        limit_tokens = limit_requests * _TOKENS_PER_REQUEST_SLOT
        remaining_requests = 0 if exhausted else max(0, limit_requests - self.stats.in_flight)
        remaining_tokens = max(0, limit_tokens - self._tokens_in_flight)
        reset = _duration(max(cfg.retry_after_s, 0.001))
        return [
            ("x-ratelimit-limit-requests", str(limit_requests)),
            ("x-ratelimit-remaining-requests", str(remaining_requests)),
            ("x-ratelimit-reset-requests", reset),
            ("x-ratelimit-limit-tokens", str(limit_tokens)),
            ("x-ratelimit-remaining-tokens", str(remaining_tokens)),
            ("x-ratelimit-reset-tokens", reset),
        ]

    def _too_many_requests(self) -> _HTTPError:
        retry_after = max(self.config.retry_after_s, 0.0)
        headers = [
            ("retry-after", str(math.ceil(retry_after))),
            ("retry-after-ms", str(round(retry_after * 1000))),
            *self._ratelimit_headers(exhausted=True),
        ]
        return _HTTPError(
            429,
            f"Rate limit reached: the simulator is configured for {self.config.capacity} "
            f"concurrent request(s). Please try again in {retry_after:g}s.",
            type_="requests",
            code="rate_limit_exceeded",
            headers=headers,
        )

    async def _chat(self, conn: _Connection, req: _Request, deployment: str | None) -> None:
        self.stats.chat_requests += 1
        self._check_auth(req)
        if deployment is not None:
            self._require_api_version(req)
        request = _chat_request(_parse_json_object(req.body), deployment)
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
        capacity = self.config.capacity
        if capacity > 0 and self.stats.in_flight >= capacity:
            raise self._too_many_requests()

        prompt_tokens = count_prompt_tokens(request.messages)
        reserved = prompt_tokens + (request.max_tokens or 256)
        self.stats.in_flight += 1
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.stats.in_flight)
        self._tokens_in_flight += reserved
        try:
            # Always three draws per admitted request, so the fault sequence for a given
            # seed does not depend on which rates happen to be set.
            error_roll, reset_roll, stall_roll = (self._rng.random() for _ in range(3))
            if error_roll < self.config.error_rate:
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
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens),
                "total_tokens": prompt_tokens + len(tokens),
            }
            plan = _ResponsePlan(
                request=request,
                tokens=tokens,
                finish_reason=finish_reason,
                usage=usage,
                reset=request.stream and reset_roll < self.config.reset_rate,
                stall=stall_roll < self.config.stall_rate,
            )
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
        generation = cfg.ttft_ms / 1000
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
        base = {
            "id": plan.completion_id,
            "object": "chat.completion.chunk",
            "created": plan.created,
            "model": request.model,
            "system_fingerprint": _SYSTEM_FINGERPRINT,
        }
        usage_field = {"usage": None} if request.include_usage else {}
        interval = 1 / cfg.tokens_per_second if cfg.tokens_per_second > 0 else 0.0
        first_at = loop.time() + cfg.ttft_ms / 1000
        fault_at = min(_FAULT_AFTER_CHUNKS, max(1, len(plan.tokens) // 2))
        fault_done = False
        tokens = plan.tokens or [""]
        for index, token in enumerate(tokens):
            if index == fault_at and (plan.reset or plan.stall):
                fault_done = True
                if plan.reset:
                    await self._pause(conn, first_at + index * interval - loop.time())
                    await self._reset(conn)
                stall_started = loop.time()
                await self._stall(conn)
                first_at += loop.time() - stall_started
            await self._pause(conn, first_at + index * interval - loop.time())
            delta: dict[str, Any] = {"content": token}
            if index == 0:
                delta = {"role": "assistant", **delta}
            last = index == len(tokens) - 1
            choice = {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": plan.finish_reason if last else None,
            }
            await self._send(
                conn, h11.Data(data=_sse({**base, "choices": [choice], **usage_field}))
            )
        if not fault_done and plan.reset:
            await self._reset(conn)
        if not fault_done and plan.stall:
            await self._stall(conn)
        if request.include_usage:
            await self._send(
                conn, h11.Data(data=_sse({**base, "choices": [], "usage": plan.usage}))
            )
        await self._send(conn, h11.Data(data=b"data: [DONE]\n\n"))
        await self._send(conn, h11.EndOfMessage())


@dataclass
class _ResponsePlan:
    """Everything decided before the first byte of a chat response is written."""

    request: ChatRequest
    tokens: list[str]
    finish_reason: str
    usage: dict[str, int]
    reset: bool
    stall: bool
    completion_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))


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
