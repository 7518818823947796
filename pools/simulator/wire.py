"""HTTP/1.1 over h11 on one TCP connection, and the JSON and SSE framing of answers.

Driving h11 ourselves, rather than using an HTTP server library, gives exact control over
every connection (keep-alive, resets, stalls, idle closes), which is what the pools are
tested against.
"""

import asyncio
import contextlib
import email.utils
import json
import socket
import ssl
import struct
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import h11

if TYPE_CHECKING:
    from pools.simulator.ratelimits import QuotaWindow

__all__ = [
    "Connection",
    "ConnectionReset",
    "HTTPError",
    "PeerGone",
    "Request",
    "base_headers",
    "json_bytes",
    "sse",
]

SERVER_NAME = "carlos-llm-simulator"
_READ_SIZE = 65_536
_MAX_BODY_BYTES = 16 * 1024 * 1024
_MAX_BUFFERED_WHILE_RESPONDING = 1024 * 1024


class HTTPError(Exception):
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


class PeerGone(Exception):
    """The client went away mid-response; stop work and drop the connection."""


class ConnectionReset(Exception):
    """We deliberately reset the connection (fault injection)."""


@dataclass
class Request:
    """One parsed HTTP request as the router sees it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def sse(obj: Any) -> bytes:
    """One server-sent event carrying `obj` as JSON."""
    return b"data: " + json_bytes(obj) + b"\n\n"


def base_headers() -> list[tuple[str, str]]:
    """What every response carries, as OpenAI's do."""
    return [
        ("date", email.utils.formatdate(usegmt=True)),
        ("server", SERVER_NAME),
        ("x-request-id", f"req_{uuid.uuid4().hex}"),
    ]


class Connection:
    """Per-connection state and I/O: the h11 machine plus bytes read while a response ran."""

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
        self.quota_windows: list[QuotaWindow] = []
        # The request log entry of the current chat request (None: not a chat request, or
        # logging is off); its status and outcome are filled in as the answer goes out.
        self.log_entry: dict[str, Any] | None = None
        # While a read waits: its timeout and when the wait began, so a live change of
        # keepalive_timeout_s can move the deadline.
        self.read_timeout: tuple[asyncio.Timeout, float] | None = None

    # --- reading ------------------------------------------------------------------------

    async def receive(self, idle_limit: float) -> bytes:
        """Bytes kept while a response ran, else a read that gives up after `idle_limit`."""
        if self.buffered:
            data = self.buffered.pop(0)
            self.buffered_bytes -= len(data)
            return data
        if self.eof:
            return b""
        started = asyncio.get_running_loop().time()
        async with asyncio.timeout(idle_limit if idle_limit > 0 else None) as timeout:
            self.read_timeout = (timeout, started)
            try:
                return await self.reader.read(_READ_SIZE)
            finally:
                self.read_timeout = None

    async def next_event(self, idle_limit: float) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.h11.they_are_waiting_for_100_continue:
                await self.send(h11.InformationalResponse(status_code=100, headers=[]))
            data = await self.receive(idle_limit)
            if not data:
                self.eof = True
            self.h11.receive_data(data)

    async def read_body(self, idle_limit: float) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self.next_event(idle_limit)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > _MAX_BODY_BYTES:
                    raise HTTPError(
                        413, "Request body too large.", code="request_too_large", close=True
                    )
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise h11.RemoteProtocolError("connection closed mid-request")

    async def watch_peer(self) -> None:
        """While a response runs, notice the client leaving (and keep any pipelined bytes)."""
        try:
            while not self.eof and self.buffered_bytes < _MAX_BUFFERED_WHILE_RESPONDING:
                data = await self.reader.read(_READ_SIZE)
                if not data:
                    self.eof = True
                    break
                self.buffered.append(data)
                self.buffered_bytes += len(data)
        except (ConnectionError, ssl.SSLError):
            self.eof = True
        if self.eof:
            self.peer_gone.set()

    # --- writing and timing -------------------------------------------------------------

    async def send(self, event: Any) -> None:
        if self.peer_gone.is_set() or self.writer.transport.is_closing():
            raise PeerGone
        data = self.h11.send(event)
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def send_body(self, *parts: bytes) -> None:
        """Each part as data, then the end of the message."""
        for part in parts:
            await self.send(h11.Data(data=part))
        await self.send(h11.EndOfMessage())

    async def pause(self, seconds: float) -> None:
        """Sleep, but give up as soon as the client disconnects."""
        if self.peer_gone.is_set():
            raise PeerGone
        if seconds <= 0:
            return
        try:
            async with asyncio.timeout(seconds):
                await self.peer_gone.wait()
        except TimeoutError:
            return
        raise PeerGone

    def reset(self) -> None:
        """Abort with SO_LINGER 0 so the kernel sends RST, as a crashed upstream would."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.aborted = True
        self.writer.transport.abort()

    def can_answer(self) -> bool:
        """Whether a response can still start (IDLE: the request itself was unparseable)."""
        return self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE)
