"""HTTP clients for the pools, and a ledger of the TCP connections they really open.

Every pooled call goes through one keep-alive `httpx.AsyncClient` per event loop; an
overflow call gets a client of its own that keeps nothing alive, so its connection is
closed as soon as the call ends. The ledger counts connections at the socket level, in
httpcore's network backend, which makes "connections opened" a measured fact.

The client's connection pool is httpcore's with its bookkeeping made cheap (`KeepAlivePool`):
httpcore's polled the socket of every idle connection and compared every pair of them twice
a request, so ten warm slots cost a call more than the rest of the client's work for it.

The connections themselves run on `AsyncioBackend`, plain asyncio protocols instead of
httpcore's default anyio streams, because anyio's read path was the client's largest CPU
cost per streamed token.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import math
import select
import ssl
import threading
import time
import typing
from asyncio.trsock import TransportSocket
from collections import Counter

import h11
import httpcore
import httpx
from httpcore._async.http11 import AsyncHTTP11Connection, HTTPConnectionState

from pools.engine.config import EndpointConfig, HttpLimits
from pools.engine.telemetry import inject_trace_context

# The pool a connection is opened for; set around each call so the ledger can attribute it.
current_pool: contextvars.ContextVar[str] = contextvars.ContextVar("current_pool", default="")


class ConnectionLedger:
    """Thread-safe counts of TCP connections opened, closed and failed, per pool."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.opened: Counter[str] = Counter()
        self.closed: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()

    def _count(self, counter: Counter[str], pool: str) -> None:
        with self._lock:
            counter[pool] += 1

    def for_pool(self, pool: str) -> dict[str, int]:
        with self._lock:
            return {
                "connections_num": self.opened[pool],
                "connections_closed": self.closed[pool],
                "connections_errors": self.failed[pool],
            }

    def open_for(self, pool: str) -> int:
        """Sockets of `pool` open now."""
        with self._lock:
            return self.opened[pool] - self.closed[pool]

    def totals(self) -> dict[str, int]:
        with self._lock:
            opened, closed = sum(self.opened.values()), sum(self.closed.values())
            return {
                "connections_open": opened - closed,
                "connections_num": opened,
                "connections_closed": closed,
                "connections_errors": sum(self.failed.values()),
            }


def _fd_is_readable(fileno: int) -> bool:
    """True when a read would not block: data, or the peer closed an idle connection."""
    if fileno < 0:
        return True
    poller = select.poll()
    poller.register(fileno, select.POLLIN)
    return bool(poller.poll(0))


# Received bytes waiting for `read`: above the high mark asyncio stops reading the socket,
# so a slow consumer pushes back on the server instead of buffering without bound.
_READ_BUFFER_HIGH = 256 * 1024
_READ_BUFFER_LOW = 64 * 1024

# httpcore's names for connection details, and asyncio's names for the same.
_EXTRA_INFO_KEYS = {
    "socket": "socket",
    "ssl_object": "ssl_object",
    "client_addr": "sockname",
    "server_addr": "peername",
}


class AsyncioStream(asyncio.Protocol, httpcore.AsyncNetworkStream):
    """One connection, and the asyncio protocol that feeds it.

    Being its own protocol keeps the per-token path short: asyncio hands each chunk to
    `data_received`, which appends it to a buffer and wakes the one waiting `read`. anyio's
    stream instead resumes and pauses the socket around every read (two epoll_ctl calls) and
    httpcore wraps each read in an anyio cancel scope; without them a loopback SSE stream
    costs the client about 30% less CPU per event.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._socket: TransportSocket | None = None  # kept for `is_readable`
        self._buffer = bytearray()
        self._reading_paused = False
        self._writing_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._read_deadline: float | None = None  # loop time the waiting read gives up at
        self._read_timer: asyncio.TimerHandle | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._eof = False  # the peer will send nothing more
        self._error: Exception | None = None  # why the connection broke, if it broke
        self._closed = False  # aclose() was called
        # Told once, when the socket is gone: closed here, or lost first (a server closing an
        # idle keep-alive connection); the ledger counts open sockets. `start_tls` hands it
        # on to the TLS stream.
        self.on_gone: typing.Callable[[], None] | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._attach(typing.cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > _READ_BUFFER_HIGH and not self._reading_paused:
            self._pause_reading()
        self._wake(self._read_waiter)

    def eof_received(self) -> None:
        # Returning None lets a plain TCP transport close itself: HTTP never half-closes.
        self._eof = True
        self._wake(self._read_waiter)

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._error = exc
        self._gone()
        self._cancel_read_timer()
        self._wake(self._read_waiter)
        self._wake(self._drain_waiter)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake(self._drain_waiter)

    # -- httpcore.AsyncNetworkStream -----------------------------------------------------

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if not self._buffer and not self._eof and not self._closed:
            await self._wait_for_data(timeout)
        if self._closed:
            raise httpcore.ReadError("read from a closed connection")
        if self._buffer:
            return self._take(max_bytes)
        if self._error is not None:
            raise httpcore.ReadError(self._error) from self._error
        return b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        if self._closed or self._eof or self._transport is None or self._transport.is_closing():
            raise httpcore.WriteError(self._error or "write to a closed connection")
        self._transport.write(buffer)
        if self._writing_paused:
            self._drain_waiter = self._loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._drain_waiter
            except TimeoutError as exc:
                raise httpcore.WriteTimeout(exc) from exc
            finally:
                self._drain_waiter = None
            if self._writing_paused:  # woken by the connection ending, not by draining
                raise httpcore.WriteError(self._error or "the connection closed while writing")

    async def aclose(self) -> None:
        """Drop the connection at once, as anyio does: no TLS close_notify, no lingering."""
        self._closed = True
        if self._transport is not None:
            self._transport.abort()
        self._gone()
        self._cancel_read_timer()
        self._wake(self._read_waiter)
        self._wake(self._drain_waiter)

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        tls_stream = AsyncioStream(self._loop)
        try:
            if self._closed or self._eof or self._transport is None:
                raise ConnectionResetError("the connection closed before the TLS handshake")
            async with asyncio.timeout(timeout):
                tls_transport = await self._loop.start_tls(
                    self._transport, tls_stream, ssl_context, server_hostname=server_hostname
                )
        except Exception as exc:
            await self.aclose()
            if isinstance(exc, TimeoutError):
                raise httpcore.ConnectTimeout(exc) from exc
            if isinstance(exc, OSError):  # ssl.SSLError included
                raise httpcore.ConnectError(exc) from exc
            raise
        # start_tls does not call connection_made on the protocol it is given.
        tls_stream._attach(typing.cast(asyncio.Transport, tls_transport))
        tls_stream.on_gone, self.on_gone = self.on_gone, None
        return tls_stream

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "is_readable":
            return self._is_readable()
        key = _EXTRA_INFO_KEYS.get(info)
        if key is None or self._transport is None:
            return None
        return self._transport.get_extra_info(key)

    # -- internals -----------------------------------------------------------------------

    async def _wait_for_data(self, timeout: float | None) -> None:
        """Wait until data, EOF or a close arrives, or raise ReadTimeout after `timeout`.

        The deadline lives on one timer per stream, moved only when a read needs it sooner
        and re-armed when it fires early, not on a timer per read: a stream reads once per
        token, and arming and cancelling an asyncio.timeout each time cost ~10 µs, about as
        much as the rest of the read.
        """
        waiter = self._read_waiter = self._loop.create_future()
        if timeout is None:
            self._read_deadline = None
        else:
            deadline = self._read_deadline = self._loop.time() + timeout
            if self._read_timer is None or self._read_timer.when() > deadline:
                self._cancel_read_timer()
                self._read_timer = self._loop.call_at(deadline, self._on_read_timer)
        try:
            await waiter
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(exc) from exc
        finally:
            self._read_waiter = None

    def _on_read_timer(self) -> None:
        self._read_timer = None
        waiter, deadline = self._read_waiter, self._read_deadline
        if waiter is None or waiter.done() or deadline is None:
            return
        if self._loop.time() >= deadline:
            waiter.set_exception(TimeoutError())
        else:
            self._read_timer = self._loop.call_at(deadline, self._on_read_timer)

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _attach(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._socket = transport.get_extra_info("socket")
        if len(self._buffer) > _READ_BUFFER_HIGH:
            self._pause_reading()

    def _take(self, max_bytes: int) -> bytes:
        buffer = self._buffer
        if len(buffer) <= max_bytes:
            data = bytes(buffer)
            buffer.clear()
        else:
            data = bytes(buffer[:max_bytes])
            del buffer[:max_bytes]
        if self._reading_paused and len(buffer) <= _READ_BUFFER_LOW:
            self._reading_paused = False
            typing.cast(asyncio.Transport, self._transport).resume_reading()
        return data

    def _pause_reading(self) -> None:
        # Data can arrive between start_tls() and _attach(); _attach() pauses then if needed.
        if self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def _is_readable(self) -> bool:
        """Whether a read would not wait: what httpcore asks to spot a dropped idle connection.

        asyncio reads the socket as data arrives, so the buffer and the EOF flag answer first;
        the poll catches what arrived since the loop last looked.
        """
        if self.seen_readable() or self._socket is None:
            return True
        return _fd_is_readable(self._socket.fileno())

    def seen_readable(self) -> bool:
        """`is_readable` as far as the event loop has seen, without asking the socket."""
        return bool(self._buffer) or self._eof or self._closed

    def _gone(self) -> None:
        on_gone, self.on_gone = self.on_gone, None
        if on_gone is not None:
            on_gone()

    @staticmethod
    def _wake(waiter: asyncio.Future[None] | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend on plain asyncio transports (see `AsyncioStream` for why).

    Errors map as in httpcore's own backends: timeouts to ConnectTimeout, other OSErrors
    (refused, unreachable, DNS failures) to ConnectError. Given a ledger, it records each TCP
    connection it opens or fails to open for the pool of the call (`current_pool`), and its
    closing.
    """

    def __init__(self, ledger: ConnectionLedger | None = None) -> None:
        self._ledger = ledger
        # Connections that ended or failed to open: `KeepAlivePool` looks over its
        # connections again only when this moved. Counted on the loop the streams live on.
        self.ended = 0

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        # asyncio sets TCP_NODELAY itself. No happy eyeballs: asyncio (3.13.0) runs them in a
        # separate task, and a call cancelled as that task connected left the socket open
        # with no one to close it (the fault tests caught it); addresses are tried in turn.
        connecting = loop.create_connection(
            lambda: AsyncioStream(loop),
            host,
            port,
            local_addr=None if local_address is None else (local_address, 0),
        )
        ledger, pool = self._ledger, current_pool.get()
        try:
            stream = await _connected(connecting, timeout, socket_options)
        except BaseException:
            self.ended += 1
            if ledger is not None:
                ledger._count(ledger.failed, pool)
            raise
        if ledger is not None:
            ledger._count(ledger.opened, pool)
        stream.on_gone = functools.partial(self._gone, pool)
        return stream

    def _gone(self, pool: str | None) -> None:
        self.ended += 1
        if self._ledger is not None and pool is not None:
            self._ledger._count(self._ledger.closed, pool)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        connecting = loop.create_unix_connection(lambda: AsyncioStream(loop), path)
        try:
            stream = await _connected(connecting, timeout, socket_options)
        except BaseException:
            self.ended += 1
            raise
        stream.on_gone = functools.partial(self._gone, None)  # not a TCP connection: no ledger
        return stream

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def _connected(
    connecting: typing.Awaitable[tuple[asyncio.Transport, AsyncioStream]],
    timeout: float | None,
    socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None,
) -> AsyncioStream:
    """Await a connection attempt, then apply socket options, mapping errors as httpcore does."""
    try:
        async with asyncio.timeout(timeout):
            transport, stream = await connecting
        try:
            for option in socket_options or ():
                transport.get_extra_info("socket").setsockopt(*option)
        except OSError:
            transport.abort()
            raise
    except TimeoutError as exc:
        raise httpcore.ConnectTimeout(exc) from exc
    except OSError as exc:
        raise httpcore.ConnectError(exc) from exc
    return stream


_ssl_lock = threading.Lock()
_ssl_contexts: dict[str, ssl.SSLContext] = {}


def ssl_context_for(endpoint: EndpointConfig) -> ssl.SSLContext:
    """One verifying SSL context per CA bundle, shared by every client (they are costly)."""
    with _ssl_lock:
        context = _ssl_contexts.get(endpoint.ca_bundle)
        if context is None:
            if endpoint.ca_bundle:
                context = ssl.create_default_context(cafile=endpoint.ca_bundle)
            else:
                context = httpx.create_ssl_context()
            _ssl_contexts[endpoint.ca_bundle] = context
        return context


class KeepAlivePool(httpcore.AsyncConnectionPool):
    """httpcore's connection pool, with the bookkeeping it does on every request made cheap.

    On every request and every response's end httpcore (1.0.9) asked each idle connection
    whether it expired, which polls its socket (a system call each), and counted the idle
    ones once per idle connection: with ten warm connections about 230 calls and 20 polls
    a request, the largest part of what the pool added to a call. Here the pass over the
    connections runs only when something can have changed since the last one: one of them
    ended or failed to open (`AsyncioBackend.ended`), the earliest keep-alive expiry came,
    or the pool holds more than `max_keepalive_connections`; it uses what the event loop
    has seen (a server's FIN included), no system call. Only the connection about to carry
    a request asks its socket, so one the server dropped a moment ago is still never handed
    out. The rules are httpcore's: the first available connection; an idle one closed once
    expired, or while the pool holds more connections than `max_keepalive_connections`; a
    new one while under `max_connections`, else an idle one replaced.
    """

    def __init__(self, *, network_backend: AsyncioBackend, **options: typing.Any) -> None:
        super().__init__(network_backend=network_backend, **options)
        self._backend = network_backend
        self._ended_seen = -1  # `network_backend.ended` at the last pass
        self._pass_due = 0.0  # the monotonic time an idle connection may first expire

    def _assign_requests_to_connections(self) -> list[httpcore.AsyncConnectionInterface]:
        connections = self._connections
        closing: list[httpcore.AsyncConnectionInterface] = []
        now = time.monotonic()
        if (
            self._backend.ended != self._ended_seen
            or now >= self._pass_due
            or len(connections) > self._max_keepalive_connections
        ):
            self._drop_ended(now, closing)
        for pool_request in self._requests:
            if not pool_request.is_queued():
                continue
            origin = pool_request.request.url.origin
            available = self._available(origin, closing)
            if available is None:
                if len(connections) >= self._max_connections:
                    idle = next((each for each in connections if each.is_idle()), None)
                    if idle is None:
                        continue  # the request waits for a connection to come free
                    connections.remove(idle)
                    closing.append(idle)
                available = self.create_connection(origin)
                connections.append(available)
            pool_request.assign_to_connection(available)
        return closing

    def _drop_ended(self, now: float, closing: list[httpcore.AsyncConnectionInterface]) -> None:
        """The pass: drop closed connections, close idle ones expired or in surplus, and note
        when the next idle one may expire (one going idle later expires later still)."""
        self._ended_seen = self._backend.ended
        connections = self._connections
        expiry = self._keepalive_expiry
        due = math.inf if expiry is None else now + expiry
        for connection in list(connections):
            if connection.is_closed():
                connections.remove(connection)
            elif connection.is_idle():
                expires_at = _idle_until(connection, now)
                if expires_at is None or len(connections) > self._max_keepalive_connections:
                    connections.remove(connection)
                    closing.append(connection)
                else:
                    due = min(due, expires_at)
        self._pass_due = due

    def _available(
        self, origin: httpcore.Origin, closing: list[httpcore.AsyncConnectionInterface]
    ) -> httpcore.AsyncConnectionInterface | None:
        """The first connection that can take a request to `origin` now; an idle one the
        server has closed meanwhile (its socket says so) is closed instead."""
        for connection in list(self._connections):
            if not (connection.can_handle_request(origin) and connection.is_available()):
                continue
            if connection.is_idle() and connection.has_expired():
                self._connections.remove(connection)
                closing.append(connection)
                continue
            return connection
        return None

    async def _close_connections(self, closing: list[httpcore.AsyncConnectionInterface]) -> None:
        if closing:  # httpcore enters a cancel scope even when there is nothing to close
            await super()._close_connections(closing)


def _idle_until(connection: httpcore.AsyncConnectionInterface, now: float) -> float | None:
    """Until when an idle connection may be kept (monotonic time), or None when it has
    expired: past its keep-alive, or its stream has seen data or end-of-file the server sent
    while it was idle. `has_expired()` without its system call."""
    http11 = getattr(connection, "_connection", None)
    stream = getattr(http11, "_network_stream", None)
    if not isinstance(stream, AsyncioStream):
        return None if connection.has_expired() else now  # unknown: look again next time
    expire_at: float | None = http11._expire_at  # type: ignore[union-attr]
    if stream.seen_readable() or (expire_at is not None and now > expire_at):
        return None
    return math.inf if expire_at is None else expire_at


def build_http_client(
    endpoint: EndpointConfig,
    limits: HttpLimits,
    ledger: ConnectionLedger,
    *,
    max_connections: int,
    max_keepalive_connections: int,
    on_response: typing.Callable[[httpx.Response], typing.Awaitable[None]] | None = None,
) -> httpx.AsyncClient:
    """An `httpx.AsyncClient` whose every TCP connection is recorded in `ledger`, and whose
    every request carries the current span's W3C `traceparent` (`pools.engine.telemetry`)."""
    ssl_context = ssl_context_for(endpoint)
    transport = httpx.AsyncHTTPTransport(verify=ssl_context)
    # Its connections: `KeepAlivePool` on the asyncio backend; tests prove the ledger's
    # counts match the server's.
    transport._pool = KeepAlivePool(
        ssl_context=ssl_context,
        max_connections=max_connections,
        max_keepalive_connections=max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=AsyncioBackend(ledger),
    )
    event_hooks: dict[str, list[typing.Any]] = {"request": [inject_trace_context]}
    if on_response:
        event_hooks["response"] = [on_response]
    return httpx.AsyncClient(
        transport=transport,
        timeout=http_timeout(limits),
        trust_env=False,
        event_hooks=event_hooks,
    )


def http_timeout(limits: HttpLimits) -> httpx.Timeout:
    return httpx.Timeout(
        limits.read_timeout, connect=limits.connect_timeout, pool=limits.connect_timeout
    )


_FINISHED = frozenset({h11.MUST_CLOSE, h11.CLOSED})


async def close_stranded_connections(client: httpx.AsyncClient) -> int:
    """Close the connections a cancelled call left ACTIVE though both sides are done.

    httpcore 1.0.9 takes a lock, a cancellation point, while it releases a finished response
    (encode/httpcore#1115): a call cancelled at that moment leaves its connection ACTIVE in
    the pool for good, socket open, counting against the pool's limit. Such a connection can
    only be closed (both h11 sides are past the response and must close), so this does it;
    the pool drops closed connections itself. Closing one whose owner is still releasing it
    is harmless: httpcore's close is idempotent.
    """
    pool = getattr(client._transport, "_pool", None)
    if pool is None:
        return 0
    stranded = []
    for connection in list(pool.connections):
        http11 = getattr(connection, "_connection", None)
        state = getattr(http11, "_h11_state", None)
        if (
            state is not None
            and http11 is not None
            and http11._state.name == "ACTIVE"
            and state.our_state in _FINISHED
            and state.their_state in _FINISHED
        ):
            stranded.append(connection)
    for connection in stranded:
        await connection.aclose()
    return len(stranded)


def _pool_of(client: httpx.AsyncClient) -> typing.Any:
    pool = getattr(client._transport, "_pool", None)
    if pool is None or not hasattr(pool, "_connections"):
        raise RuntimeError("this httpcore version has no connection list; pin httpcore 1.0.x")
    return pool


async def live_connections(client: httpx.AsyncClient) -> int:
    """Connections of `client` that can carry a request now or are carrying one.

    Idle ones the server has closed (their socket reads end-of-file) are taken out of the
    pool and closed here, as httpcore would do only at the next request.
    """
    pool = _pool_of(client)
    dead = []
    with pool._optional_thread_lock:
        for connection in list(pool._connections):
            if connection.is_closed() or (connection.is_idle() and connection.has_expired()):
                pool._connections.remove(connection)
                dead.append(connection)
        live = len(pool._connections)
    for connection in dead:
        await connection.aclose()
    return live


async def open_idle_connections(
    client: httpx.AsyncClient, url: str, count: int, connect_timeout: float
) -> int:
    """Open `count` keep-alive connections to `url`'s origin without sending any request.

    Warm-up must not spend the endpoint's quota: a request per slot spent 25 requests of a
    40-a-minute key before any user arrived. A connection is TCP (and TLS) only, so it is
    opened as httpcore would open it for a request, and handed to the pool as idle. Returns
    how many were opened; connection errors propagate.
    """
    pool = _pool_of(client)
    request = httpcore.Request("GET", url, extensions={"timeout": {"connect": connect_timeout}})
    origin = request.url.origin

    async def open_one() -> None:
        connection = pool.create_connection(origin)
        stream = await connection._connect(request)
        http11 = AsyncHTTP11Connection(
            origin=origin, stream=stream, keepalive_expiry=pool._keepalive_expiry
        )
        http11._state = HTTPConnectionState.IDLE
        if pool._keepalive_expiry is not None:
            http11._expire_at = time.monotonic() + pool._keepalive_expiry
        connection._connection = http11
        with pool._optional_thread_lock:
            if len(pool._connections) < pool._max_connections:
                pool._connections.append(connection)
                return
        await connection.aclose()

    results = await asyncio.gather(*(open_one() for _ in range(count)), return_exceptions=True)
    errors = [result for result in results if isinstance(result, BaseException)]
    if errors:
        raise errors[0]
    return count
