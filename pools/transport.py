"""HTTP clients for the pools, and a ledger of the TCP connections they really open.

Every pooled call goes through one keep-alive `httpx.AsyncClient` per event loop; an
overflow call gets a client of its own that keeps nothing alive, so its connection is
closed as soon as the call ends. The ledger counts connections at the socket level by
wrapping httpcore's network backend, which makes "connections opened" a measured fact.
"""

from __future__ import annotations

import contextvars
import select
import socket
import ssl
import threading
import typing
from collections import Counter
from dataclasses import dataclass

import httpcore
import httpx

from pools.config import EndpointConfig, HttpLimits

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

    def totals(self) -> dict[str, int]:
        with self._lock:
            opened, closed = sum(self.opened.values()), sum(self.closed.values())
            return {
                "connections_open": opened - closed,
                "connections_num": opened,
                "connections_closed": closed,
                "connections_errors": sum(self.failed.values()),
            }


@dataclass(eq=False)
class _ConnectionRecord:
    ledger: ConnectionLedger
    pool: str
    closed: bool = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.ledger._count(self.ledger.closed, self.pool)


def _is_readable(sock: socket.socket | None) -> bool:
    """True when a read would not block: data, or the peer closed an idle connection."""
    fileno = sock.fileno() if sock is not None else -1
    if fileno < 0:
        return True
    poller = select.poll()
    poller.register(fileno, select.POLLIN)
    return bool(poller.poll(0))


class _CountedStream(httpcore.AsyncNetworkStream):
    """A connection that reports its closing to the ledger.

    It also answers httpcore's "is_readable" probe from a cached socket: httpcore asks it of
    every idle connection on every request, and anyio's attribute lookup behind it costs
    tens of microseconds each time, which made a warm pool slower than a single client.
    """

    def __init__(self, inner: httpcore.AsyncNetworkStream, record: _ConnectionRecord) -> None:
        self._inner = inner
        self._record = record
        self._socket: socket.socket | None = inner.get_extra_info("socket")

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._record.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        inner = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        return _CountedStream(inner, self._record)

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "is_readable":
            return _is_readable(self._socket)
        if info == "socket":
            return self._socket
        return self._inner.get_extra_info(info)


class _CountingBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, inner: httpcore.AsyncNetworkBackend, ledger: ConnectionLedger) -> None:
        self._inner = inner
        self._ledger = ledger

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        pool = current_pool.get()
        try:
            stream = await self._inner.connect_tcp(
                host,
                port,
                timeout=timeout,
                local_address=local_address,
                socket_options=socket_options,
            )
        except BaseException:
            self._ledger._count(self._ledger.failed, pool)
            raise
        self._ledger._count(self._ledger.opened, pool)
        return _CountedStream(stream, _ConnectionRecord(self._ledger, pool))

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return await self._inner.connect_unix_socket(path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


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


def build_http_client(
    endpoint: EndpointConfig,
    limits: HttpLimits,
    ledger: ConnectionLedger,
    *,
    max_connections: int,
    max_keepalive_connections: int,
    on_response: typing.Callable[[httpx.Response], typing.Awaitable[None]] | None = None,
) -> httpx.AsyncClient:
    """An `httpx.AsyncClient` whose every TCP connection is recorded in `ledger`."""
    transport = httpx.AsyncHTTPTransport(
        verify=ssl_context_for(endpoint),
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
        ),
    )
    pool = (
        transport._pool
    )  # httpcore.AsyncConnectionPool; tests prove the counts match the server's
    if not hasattr(pool, "_network_backend"):
        raise RuntimeError("this httpcore version has no _network_backend; pin httpcore 1.0.x")
    pool._network_backend = _CountingBackend(pool._network_backend, ledger)
    return httpx.AsyncClient(
        transport=transport,
        timeout=http_timeout(limits),
        trust_env=False,
        event_hooks={"response": [on_response]} if on_response else None,
    )


def http_timeout(limits: HttpLimits) -> httpx.Timeout:
    return httpx.Timeout(
        limits.read_timeout, connect=limits.connect_timeout, pool=limits.connect_timeout
    )
