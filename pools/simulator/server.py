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

This module is the server itself (listening, connections, routing, chat admission); the
other concerns live beside it: `config` (settings, live-setting checks, counters), `wire`
(HTTP/1.1 and SSE framing over h11), `validation` (the OpenAI/Azure request surface),
`ratelimits` (capacity, quotas, 429s and their headers), `responses` (answers and the faults
acted out in them), `requestlog` and `control` (the /_simulator/ endpoints).
"""

import asyncio
import contextlib
import functools
import inspect
import logging
import random
import re
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import h11

from pools.simulator.config import (
    FAULT_FIELDS,
    QUOTA_DEFAULT_MAX_TOKENS,
    SimulatorConfig,
    SimulatorStats,
    clean_fault_value,
)
from pools.simulator.control import serve_control
from pools.simulator.ratelimits import RateLimits
from pools.simulator.requestlog import RequestLog
from pools.simulator.responders import (
    ChatRequest,
    Responder,
    count_prompt_tokens,
    default_responder,
)
from pools.simulator.responses import FaultRolls, ResponseWriter, plan_answer
from pools.simulator.tls import SimulatorTLS
from pools.simulator.validation import (
    allow,
    chat_request,
    check_auth,
    deployment_not_found,
    model_entry,
    model_not_found,
    parse_json_object,
    require_api_version,
)
from pools.simulator.wire import Connection, ConnectionReset, HTTPError, PeerGone, Request

__all__ = ["LLMSimulator"]

logger = logging.getLogger(__name__)

_DEFAULT_MODELS = ("gpt-4o", "gpt-4o-mini")
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
_AZURE_CHAT_RE = re.compile(r"/openai/deployments/([^/]+)/chat/completions")
_MODEL_RE = re.compile(r"/v1/models/([^/]+)")
# Tokens reserved for a chat request without max_tokens, in the advertised token headroom.
_RESERVED_COMPLETION_TOKENS = 256


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
        self._connections: dict[asyncio.Task[Any], Connection] = {}
        for key in FAULT_FIELDS:
            clean_fault_value(key, getattr(self.config, key))  # fail early on a bad config
        self._rng = random.Random(self.config.seed)
        # The stream-fault rolls come from their own generator, so the sequence of the
        # original three rolls per request (error, reset, stall) is what it always was.
        self._stream_rng = random.Random(f"{self.config.seed}:stream-faults")
        self.limits = RateLimits(self.config, self.stats)
        self.writer = ResponseWriter(self.config, self.stats, self.limits)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start_lock = asyncio.Lock()
        self.request_log = RequestLog(self.config.request_log)

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

    # --- stats, runtime faults and the request log ----------------------------------------

    def reset_stats(self) -> None:
        """Zero the counters and empty the request log; live gauges (open connections,
        in-flight requests) are kept. Request seq numbers keep counting up."""
        self._epoch += 1
        self.request_log.clear()
        self.stats.reset_counters()

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
        clean = {key: clean_fault_value(key, value) for key, value in changes.items()}
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

    def requests_log(self, since: int = 0) -> list[dict[str, Any]]:
        """Copies of the logged chat requests with seq > `since`, oldest first."""
        return self.request_log.since(since)

    @property
    def requests_dropped(self) -> int:
        """How many logged requests fell out of the bounded log since the last reset."""
        return self.request_log.dropped

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
        conn = Connection(reader, writer, self._epoch)
        self._connections[task] = conn
        self.stats.connections_accepted += 1
        self.stats.connections_open += 1
        try:
            await self._serve(conn)
        except TimeoutError:
            pass  # a client that stopped sending mid-request: close it politely too
        except (PeerGone, ConnectionReset, ConnectionError):
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

    def _mark_control(self, conn: Connection) -> None:
        """Connections opened just to call /_simulator/* stay out of the counters.

        Otherwise observing the simulator (say, fetching stats from another process) would
        change the very connection counts a test is trying to prove.
        """
        conn.control = True
        self.stats.connections_open -= 1
        if conn.epoch == self._epoch:
            self.stats.connections_accepted -= 1

    async def _serve(self, conn: Connection) -> None:
        rtt = self.config.rtt_ms / 1000
        if rtt > 0:
            # Emulated TCP handshake, plus the TLS one when serving HTTPS.
            await asyncio.sleep(rtt * (2 if self.config.tls else 1))
        while True:
            try:
                try:
                    event = await conn.next_event(self.config.keepalive_timeout_s)
                except TimeoutError:
                    # Idle keep-alive connection: close it with a FIN, as uvicorn does.
                    idle = not conn.h11.trailing_data[0]  # not half-way through a request
                    if idle and conn.control is not True:
                        self.stats.idle_closes += 1
                    return
                if not isinstance(event, h11.Request):
                    return  # h11.ConnectionClosed, or nothing a server can answer
                body = await conn.read_body(self.config.keepalive_timeout_s)
            except h11.RemoteProtocolError as exc:
                await self.writer.protocol_error(conn, exc)
                return
            except HTTPError as err:
                await self.writer.error(conn, err)
                return
            await self._handle_request(conn, event, body)
            if conn.aborted or conn.h11.our_state is not h11.DONE:
                return
            if conn.h11.their_state is not h11.DONE:
                return
            conn.h11.start_next_cycle()

    # --- request handling ---------------------------------------------------------------

    async def _handle_request(self, conn: Connection, event: h11.Request, body: bytes) -> None:
        target = event.target.decode("latin-1")
        parts = urlsplit(target)
        request = Request(
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

        watcher = asyncio.create_task(conn.watch_peer())
        try:
            try:
                await self._route(conn, request)
            except HTTPError as err:
                await self.writer.error(conn, err)
            except (PeerGone, ConnectionReset, ConnectionError, ssl.SSLError):
                raise
            except Exception as exc:
                logger.exception("LLM simulator failed handling %s %s", request.method, target)
                await self.writer.error(
                    conn,
                    HTTPError(
                        500,
                        f"The simulator failed while processing your request: {exc}",
                        type_="server_error",
                        code="server_error",
                        close=True,
                    ),
                )
        finally:
            RequestLog.ended(conn.log_entry)
            watcher.cancel()
            await asyncio.wait([watcher])

    async def _route(self, conn: Connection, req: Request) -> None:
        path = req.path
        if path.startswith("/_simulator/"):
            await serve_control(self, conn, req)
            return
        rtt = self.config.rtt_ms / 1000
        if rtt > 0:
            await conn.pause(rtt)
        if path == "/v1/chat/completions":
            allow(req, "POST")
            await self._chat(conn, req, deployment=None)
        elif match := _AZURE_CHAT_RE.fullmatch(path):
            allow(req, "POST")
            await self._chat(conn, req, deployment=unquote(match[1]))
        elif path in ("/v1/models", "/openai/models"):
            allow(req, "GET")
            check_auth(req, self.config.api_key)
            if path.startswith("/openai/"):
                require_api_version(req)
            self.limits.charge(conn, req, None, "Models_List", listed=self._models())
            models = [model_entry(m) for m in self._models()]
            await self.writer.json(conn, 200, {"object": "list", "data": models})
        elif match := _MODEL_RE.fullmatch(path):
            allow(req, "GET")
            check_auth(req, self.config.api_key)
            model = unquote(match[1])
            if model not in self._models():
                raise model_not_found(model)
            self.limits.charge(conn, req, model, "Models_Get")
            await self.writer.json(conn, 200, model_entry(model))
        else:
            raise HTTPError(
                404,
                f"Unknown request URL: {req.method} {path}. Please check the URL for typos.",
                code="unknown_url",
            )

    def _models(self) -> tuple[str, ...]:
        return self.config.deployments if self.config.deployments is not None else _DEFAULT_MODELS

    # --- chat completions ---------------------------------------------------------------

    async def _chat(self, conn: Connection, req: Request, deployment: str | None) -> None:
        self.stats.chat_requests += 1
        conn.log_entry = entry = self.request_log.arrival(
            req.headers.get("traceparent"), deployment
        )
        check_auth(req, self.config.api_key)
        if deployment is not None:
            require_api_version(req)
        request = chat_request(parse_json_object(req.body), deployment)
        if entry is not None:
            entry.update(model=request.model, stream=request.stream, messages=request.messages)
        deployments = self.config.deployments
        if deployments is not None and request.model not in deployments:
            if deployment is not None:
                raise deployment_not_found()
            raise model_not_found(request.model)
        cfg = self.config
        faulty = cfg.faults_apply_to(request.model)
        if faulty and cfg.next_429 > 0:
            cfg.next_429 -= 1
            raise self.limits.scripted_429(conn, req, request.model)
        prompt_tokens = count_prompt_tokens(request.messages)
        charge = prompt_tokens + (request.max_tokens or QUOTA_DEFAULT_MAX_TOKENS)
        windows = self.limits.check(conn, req, request.model, charge, "ChatCompletions_Create")
        capacity = cfg.capacity
        if capacity > 0 and self.stats.in_flight >= capacity:
            raise self.limits.too_many_requests(conn)
        self.limits.consume(windows, charge)

        reserved = prompt_tokens + (request.max_tokens or _RESERVED_COMPLETION_TOKENS)
        others_in_flight = self.stats.in_flight
        self.stats.in_flight += 1
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.stats.in_flight)
        self.limits.tokens_in_flight += reserved
        try:
            rolls = FaultRolls.draw(self._rng, self._stream_rng)
            if faulty and rolls.error < cfg.error_rate:
                raise HTTPError(
                    500,
                    "The server had an error while processing your request. Sorry about that!",
                    type_="server_error",
                    code="server_error",
                )
            plan = plan_answer(
                request,
                await self._respond(request),
                config=cfg,
                rolls=rolls,
                faulty=faulty,
                prompt_tokens=prompt_tokens,
                ttft_s=(cfg.ttft_ms + cfg.ttft_per_request_ms * others_in_flight) / 1000,
            )
            if plan.shape == "empty":
                self.stats.empties += 1
            if request.stream:
                await self.writer.stream(conn, plan)
            else:
                await self.writer.completion(conn, plan)
        finally:
            self.stats.in_flight -= 1
            self.limits.tokens_in_flight -= reserved

    async def _respond(self, request: ChatRequest) -> str:
        result: Any = self.responder(request)
        if inspect.isawaitable(result):
            result = await result
        if not isinstance(result, str):
            raise TypeError(f"responder returned {type(result).__name__}, expected str")
        return result
