"""The asyncio network backend against real TCP and TLS servers, and inside the pool's client."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import select
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest
import trustme

from pools.engine import transport
from pools.engine.config import parse_config
from pools.engine.transport import (
    _READ_BUFFER_HIGH,
    AsyncioBackend,
    ConnectionLedger,
    build_http_client,
    current_pool,
    open_idle_connections,
)
from pools.simulator import LLMSimulator
from tests.helpers.waiting import eventually

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

# asyncio's selector transport reads at most this much per recv(); the buffer may overshoot
# the high mark by one such read before reading pauses.
ASYNCIO_MAX_RECV = 256 * 1024


@contextlib.asynccontextmanager
async def serving(
    handler: Handler, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[int]:
    """Run `handler` for each connection on 127.0.0.1 and yield the port; stop them all after."""
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass  # the client under test dropped the connection: that is often the point
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ssl_context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        server.abort_clients()
        await server.wait_closed()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


async def read_exactly(stream: httpcore.AsyncNetworkStream, size: int) -> bytes:
    received = bytearray()
    while len(received) < size:
        chunk = await stream.read(65536, timeout=5)
        assert chunk, "unexpected EOF"
        received += chunk
    return bytes(received)


@contextlib.asynccontextmanager
async def connected(port: int, **options: Any) -> AsyncIterator[httpcore.AsyncNetworkStream]:
    """A stream from AsyncioBackend to the local `port`, closed however the block ends."""
    stream = await AsyncioBackend().connect_tcp("127.0.0.1", port, **options)
    try:
        yield stream
    finally:
        await stream.aclose()


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_server_context(tls_ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context


@pytest.fixture(scope="module")
def tls_client_context(tls_ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    tls_ca.configure_trust(context)
    return context


# --- plain TCP -------------------------------------------------------------------------------


async def test_write_and_read_round_trip() -> None:
    async with serving(echo) as port, connected(port, timeout=5) as stream:
        await stream.write(b"hello, ", timeout=5)
        await stream.write(b"world", timeout=5)
        assert await read_exactly(stream, 12) == b"hello, world"
        assert stream.get_extra_info("server_addr")[1] == port
        assert stream.get_extra_info("client_addr")[0] == "127.0.0.1"
        assert stream.get_extra_info("socket").fileno() >= 0
        assert stream.get_extra_info("ssl_object") is None
        assert stream.get_extra_info("is_readable") is False


async def test_read_returns_empty_bytes_once_the_peer_closes() -> None:
    async def say_goodbye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        await writer.drain()

    async with serving(say_goodbye) as port, connected(port) as stream:
        assert await read_exactly(stream, 3) == b"bye"
        assert await stream.read(100, timeout=5) == b""
        assert await stream.read(100, timeout=5) == b""  # and it stays at EOF
        with pytest.raises(httpcore.WriteError):
            await stream.write(b"too late")


async def test_read_times_out_with_read_timeout() -> None:
    go = asyncio.Event()

    async def answer_late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await go.wait()
        writer.write(b"late")
        await writer.drain()
        await reader.read()

    async with serving(answer_late) as port, connected(port) as stream:
        started = time.monotonic()
        with pytest.raises(httpcore.ReadTimeout):
            await stream.read(100, timeout=0.05)
        assert time.monotonic() - started < 1
        go.set()
        assert await stream.read(100, timeout=5) == b"late"  # still usable afterwards


async def test_each_read_keeps_its_own_deadline() -> None:
    """The read deadline timer is reused across reads; a shorter or absent timeout must win."""
    send = asyncio.Queue[bytes]()

    async def send_on_demand(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            writer.write(await send.get())
            await writer.drain()

    async with serving(send_on_demand) as port, connected(port) as stream:
        send.put_nowait(b"a")
        assert await stream.read(100, timeout=30) == b"a"  # leaves a timer 30 s out
        started = time.monotonic()
        with pytest.raises(httpcore.ReadTimeout):
            await stream.read(100, timeout=0.1)
        assert time.monotonic() - started < 2

        send.put_nowait(b"b")
        assert await stream.read(100, timeout=0.2) == b"b"  # leaves a timer 0.2 s out
        asyncio.get_running_loop().call_later(0.5, send.put_nowait, b"c")
        assert await stream.read(100, timeout=None) == b"c"  # outlives that timer


async def test_connecting_to_a_closed_port_raises_connect_error() -> None:
    with pytest.raises(httpcore.ConnectError):
        await AsyncioBackend().connect_tcp("127.0.0.1", closed_port(), timeout=5)


async def test_socket_options_and_local_address_are_applied() -> None:
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    async with (
        serving(echo) as port,
        connected(port, local_address="127.0.0.1", socket_options=options) as stream,
    ):
        sock = stream.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert stream.get_extra_info("client_addr")[0] == "127.0.0.1"


async def test_is_readable_once_the_peer_closes_an_idle_connection() -> None:
    hang_up = asyncio.Event()

    async def answer_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await reader.readexactly(4)
        writer.write(b"pong")
        await writer.drain()
        await hang_up.wait()

    async with serving(answer_then_hang_up) as port, connected(port) as stream:
        await stream.write(b"ping")
        assert await read_exactly(stream, 4) == b"pong"
        await asyncio.sleep(0.05)
        assert stream.get_extra_info("is_readable") is False  # idle and open
        hang_up.set()
        await eventually(lambda: stream.get_extra_info("is_readable"))
        assert await stream.read(100, timeout=5) == b""


async def test_aclose_twice_and_on_a_reset_connection_is_harmless() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()  # SO_LINGER 0: the kernel answers with RST

    async with serving(reset) as port:
        backend = AsyncioBackend()
        stream = await backend.connect_tcp("127.0.0.1", port)
        await stream.write(b"x")
        with pytest.raises(httpcore.ReadError):
            await stream.read(100, timeout=5)
        await stream.aclose()
        await stream.aclose()

        healthy = await backend.connect_tcp("127.0.0.1", port)
        await healthy.aclose()
        await healthy.aclose()
        with pytest.raises(httpcore.ReadError):
            await healthy.read(100)
        with pytest.raises(httpcore.WriteError):
            await healthy.write(b"x")
        assert healthy.get_extra_info("is_readable") is True


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_large_body_arrives_intact_and_a_slow_reader_holds_the_sender_back(
    tls: bool, tls_server_context: ssl.SSLContext, tls_client_context: ssl.SSLContext
) -> None:
    body = os.urandom(8 * 1024 * 1024)
    sent_all = asyncio.Event()

    async def send_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        writer.write(body)
        await writer.drain()
        sent_all.set()

    small_receive_buffer = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)]
    async with serving(send_body, tls_server_context if tls else None) as port:
        stream = await AsyncioBackend().connect_tcp(
            "127.0.0.1", port, socket_options=small_receive_buffer
        )
        if tls:
            stream = await stream.start_tls(tls_client_context, "localhost", timeout=5)
        try:
            await asyncio.sleep(0.3)  # not reading: the client must stop taking data
            assert len(stream._buffer) <= _READ_BUFFER_HIGH + ASYNCIO_MAX_RECV
            # Over TLS, asyncio's server reports the body written once it is encrypted into
            # its own buffer, so only plain TCP shows the back-pressure reaching the sender.
            assert tls or not sent_all.is_set()
            received = await read_exactly(stream, len(body))
            assert hashlib.sha256(received).digest() == hashlib.sha256(body).digest()
            assert await stream.read(65536, timeout=5) == b""
        finally:
            await stream.aclose()


async def test_write_to_a_peer_that_does_not_read_times_out() -> None:
    async def ignore(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    small_send_buffer = [(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)]
    async with serving(ignore) as port, connected(port, socket_options=small_send_buffer) as stream:
        with pytest.raises(httpcore.WriteTimeout):
            await stream.write(b"x" * (16 * 1024 * 1024), timeout=0.2)


# --- TLS -------------------------------------------------------------------------------------


async def test_tls_round_trip_and_close(
    tls_server_context: ssl.SSLContext, tls_client_context: ssl.SSLContext
) -> None:
    hang_up = asyncio.Event()

    async def echo_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        writer.write(await reader.readexactly(5))
        await writer.drain()
        await hang_up.wait()

    async with serving(echo_then_hang_up, tls_server_context) as port:
        tcp = await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=5)
        stream = await tcp.start_tls(tls_client_context, server_hostname="localhost", timeout=5)
        try:
            ssl_object = stream.get_extra_info("ssl_object")
            assert ssl_object is not None and ssl_object.version().startswith("TLS")
            assert stream.get_extra_info("server_addr")[1] == port
            await stream.write(b"hello", timeout=5)
            assert await read_exactly(stream, 5) == b"hello"
            assert stream.get_extra_info("is_readable") is False
            hang_up.set()
            await eventually(lambda: stream.get_extra_info("is_readable"))
            assert await stream.read(100, timeout=5) == b""
        finally:
            await stream.aclose()
            await stream.aclose()


async def test_tls_with_an_untrusted_certificate_raises_connect_error(
    tls_server_context: ssl.SSLContext,
) -> None:
    async with serving(echo, tls_server_context) as port:
        tcp = await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=5)
        with pytest.raises(httpcore.ConnectError):
            await tcp.start_tls(ssl.create_default_context(), "localhost", timeout=5)
        assert tcp.get_extra_info("is_readable") is True  # closed on the way out


# --- inside the pool's HTTP client -----------------------------------------------------------


def chat_stream_request(max_tokens: int) -> dict[str, object]:
    return {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "Stream a design for a ledger service"}],
        "max_tokens": max_tokens,
        "stream": True,
    }


async def stream_tokens(
    client: httpx.AsyncClient, base_url: str, max_tokens: int = 40
) -> list[str]:
    tokens: list[str] = []
    async with client.stream(
        "POST", f"{base_url}/chat/completions", json=chat_stream_request(max_tokens)
    ) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line.removeprefix("data: "))["choices"]
                tokens.extend(choice["delta"].get("content", "") for choice in choices)
    return tokens


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_pool_client_streams_and_the_ledger_counts_real_connections(
    simulator_factory, tmp_path: Path, tls: bool
) -> None:
    # Idle connections are closed after 1.5 s: long enough for two streams back to back on a
    # busy machine, short enough to wait for.
    simulator: LLMSimulator = await simulator_factory(tls=tls, keepalive_timeout_s=1.5)
    endpoint = {"SIMULATOR_URL": simulator.base_url}
    if tls:
        simulator.write_ca_pem(tmp_path / "ca.pem")
        endpoint["CA_BUNDLE"] = str(tmp_path / "ca.pem")
    config = parse_config({"ENDPOINT": endpoint})
    ledger = ConnectionLedger()
    client = build_http_client(
        config.endpoint, config.http, ledger, max_connections=4, max_keepalive_connections=4
    )
    token = current_pool.set("main")
    try:
        first = await stream_tokens(client, simulator.base_url)
        second = await stream_tokens(client, simulator.base_url)
        assert len(first) > 5 and first == second
        # Two streams, one keep-alive connection, on both sides of the socket.
        assert ledger.for_pool("main") == {
            "connections_num": 1,
            "connections_closed": 0,
            "connections_errors": 0,
        }
        assert simulator.stats.connections_accepted == 1

        # The simulator closes the idle connection; the pool must notice ("is_readable")
        # and open a fresh one instead of failing the next request. The server counts the
        # close when it asks for it; wait until the FIN is on the client's socket too.
        pool = client._transport._pool  # type: ignore[attr-defined]
        await eventually(
            lambda: (
                simulator.stats.connections_open == 0
                and all(connection.has_expired() for connection in pool.connections)
            )
        )
        assert await stream_tokens(client, simulator.base_url) == first
        assert ledger.for_pool("main") == {
            "connections_num": 2,
            "connections_closed": 1,
            "connections_errors": 0,
        }
    finally:
        current_pool.reset(token)
        await client.aclose()
    assert ledger.totals()["connections_open"] == 0
    assert ledger.for_pool("main")["connections_closed"] == 2


async def test_pool_client_counts_failed_connections() -> None:
    base_url = f"http://127.0.0.1:{closed_port()}/v1"
    config = parse_config({"ENDPOINT": {"SIMULATOR_URL": base_url}})
    ledger = ConnectionLedger()
    client = build_http_client(
        config.endpoint, config.http, ledger, max_connections=1, max_keepalive_connections=1
    )
    token = current_pool.set("mini")
    try:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{base_url}/models")
    finally:
        current_pool.reset(token)
        await client.aclose()
    assert ledger.for_pool("mini") == {
        "connections_num": 0,
        "connections_closed": 0,
        "connections_errors": 1,
    }


# --- the pool's connection bookkeeping (KeepAlivePool) ---------------------------------------


class KeepAliveServer:
    """A minimal HTTP/1.1 server that answers every GET with `ok` on keep-alive connections,
    and can cut one connection from its side without the client's event loop running."""

    def __init__(self) -> None:
        self.requests_by_client_port: dict[int, int] = {}
        self.writers: dict[int, asyncio.StreamWriter] = {}

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client_port = writer.get_extra_info("peername")[1]
        self.writers[client_port] = writer
        while await reader.readuntil(b"\r\n\r\n"):
            self.requests_by_client_port[client_port] = (
                self.requests_by_client_port.get(client_port, 0) + 1
            )
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    def hang_up(self, client_port: int) -> None:
        """Send FIN on the connection from `client_port` now (a system call, no loop turn)."""
        self.writers[client_port].get_extra_info("socket").shutdown(socket.SHUT_RDWR)


def pool_client(
    port: int, ledger: ConnectionLedger, *, max_connections: int, keepalive: int, **http: Any
) -> httpx.AsyncClient:
    config = parse_config({"ENDPOINT": {"SIMULATOR_URL": f"http://127.0.0.1:{port}/v1"}, **http})
    return build_http_client(
        config.endpoint,
        config.http,
        ledger,
        max_connections=max_connections,
        max_keepalive_connections=keepalive,
    )


def client_ports(client: httpx.AsyncClient) -> list[int]:
    """The local port of each connection in the client's pool, in the pool's order."""
    pool = client._transport._pool  # type: ignore[attr-defined]
    return [
        connection._connection._network_stream.get_extra_info("client_addr")[1]
        for connection in pool.connections
    ]


async def test_a_request_asks_the_socket_of_only_the_connection_it_takes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # httpcore polled the socket of every idle connection twice per request (when the
    # request arrived and when its response ended): 16 system calls a request with eight
    # warm connections, and the pool's largest cost per call. Now only the one connection
    # about to carry the request is asked whether the server dropped it.
    polls: list[int] = []
    real_poll = transport._fd_is_readable

    def counted_poll(fileno: int) -> bool:
        polls.append(fileno)
        return real_poll(fileno)

    server = KeepAliveServer()
    ledger = ConnectionLedger()
    async with serving(server) as port:
        client = pool_client(port, ledger, max_connections=8, keepalive=8)
        try:
            base = f"http://127.0.0.1:{port}"
            assert await open_idle_connections(client, base, 8, connect_timeout=5) == 8
            monkeypatch.setattr(transport, "_fd_is_readable", counted_poll)
            for _ in range(5):
                assert (await client.get(f"{base}/v1/models")).text == "ok"
        finally:
            await client.aclose()
    assert len(polls) == 5  # one per request, on the connection that carried it
    assert sum(server.requests_by_client_port.values()) == 5
    assert ledger.totals()["connections_num"] == 8  # the warm connections were used


async def test_an_idle_connection_the_server_dropped_is_never_handed_out() -> None:
    # The server's FIN is on the socket, but the event loop has not run since: only asking
    # the socket can tell. The request goes on the other warm connection, the dead one is
    # closed and counted.
    server = KeepAliveServer()
    ledger = ConnectionLedger()
    async with serving(server) as port:
        client = pool_client(port, ledger, max_connections=2, keepalive=2)
        try:
            base = f"http://127.0.0.1:{port}"
            await open_idle_connections(client, base, 2, connect_timeout=5)
            await eventually(lambda: len(server.writers) == 2)
            dropped, kept = client_ports(client)
            server.hang_up(dropped)
            stream = client._transport._pool.connections[0]._connection._network_stream  # type: ignore[attr-defined]
            readable, _, _ = select.select([stream.get_extra_info("socket").fileno()], [], [], 5)
            assert readable and not stream.seen_readable()  # the loop has not seen it yet
            assert (await client.get(f"{base}/v1/models")).text == "ok"
            assert client_ports(client) == [kept]
        finally:
            await client.aclose()
    assert server.requests_by_client_port == {kept: 1}
    assert ledger.totals() == {
        "connections_open": 0,
        "connections_num": 2,
        "connections_closed": 2,
        "connections_errors": 0,
    }


async def test_a_connection_the_server_closed_leaves_the_pool_at_the_next_request() -> None:
    # Not the one the request takes: the pool's pass drops it because the loop saw it end,
    # so it no longer counts against max_connections or max_keepalive_connections.
    server = KeepAliveServer()
    ledger = ConnectionLedger()
    async with serving(server) as port:
        client = pool_client(port, ledger, max_connections=3, keepalive=3)
        try:
            base = f"http://127.0.0.1:{port}"
            await open_idle_connections(client, base, 3, connect_timeout=5)
            await eventually(lambda: len(server.writers) == 3)
            first, dropped, last = client_ports(client)
            server.hang_up(dropped)
            await eventually(lambda: ledger.totals()["connections_closed"] == 1)
            assert client_ports(client) == [first, dropped, last]  # nothing asked the pool yet
            assert (await client.get(f"{base}/v1/models")).text == "ok"
            assert client_ports(client) == [first, last]
        finally:
            await client.aclose()
    assert server.requests_by_client_port == {first: 1}


async def test_the_pool_keeps_httpcores_rules_for_idle_and_new_connections() -> None:
    server = KeepAliveServer()
    ledger = ConnectionLedger()
    async with serving(server) as port:
        client = pool_client(
            port, ledger, max_connections=2, keepalive=1, HTTP={"KEEPALIVE_EXPIRY": 0.2}
        )
        try:
            base = f"http://127.0.0.1:{port}"
            # Two at once need two connections; once both are idle, the pool holds more than
            # max_keepalive_connections and closes the surplus.
            async with (
                client.stream("GET", f"{base}/a") as a,
                client.stream("GET", f"{base}/b") as b,
            ):
                assert len(client_ports(client)) == 2
                assert await a.aread() == await b.aread() == b"ok"
            assert len(client_ports(client)) == 1
            (first,) = client_ports(client)
            await client.get(f"{base}/c")
            assert client_ports(client) == [first]  # reused while within its keep-alive
            # Past the keep-alive expiry the idle connection is closed, not reused.
            await asyncio.sleep(0.3)
            await client.get(f"{base}/d")
            assert first not in client_ports(client)
            # At max_connections, a request to another origin replaces an idle connection.
            await client.get(f"http://localhost:{port}/e")
            (only,) = client._transport._pool.connections  # type: ignore[attr-defined]
            assert only.can_handle_request(httpcore.URL(f"http://localhost:{port}/").origin)
        finally:
            await client.aclose()
    assert ledger.totals()["connections_num"] == 4
    assert ledger.totals()["connections_open"] == 0
