"""Measure the pool against the alternatives, in one interleaved run over real TLS sockets.

Four ways to call the same endpoint, taking turns in a shuffled order every round so that
drift on the machine hits them all alike:

- `pooled`: this project's pool (warmed, shared keep-alive client);
- `fresh`: a new SDK client (and so a new connection and TLS handshake) for every call;
- `reused`: one SDK client created once and reused, the best case without a pool;
- `original`: the original design, an exclusive SDK object per slot, each with its own
  HTTP client, warmed by building objects only (no connection is opened).

Beside it, with no emulated network delay (where what the client itself does shows): one
non-streamed call, pooled against the bare SDK with one reused client, over TLS and plain
HTTP (`run_zero_delay`), and the client's CPU per chunk of a long stream, pooled against the
SDK's streaming and bare httpx line reading (`run_stream_cpu`).

Plain asyncio; `manage.py benchmark_pools` runs it against simulators in child processes.
"""

from __future__ import annotations

import random
import ssl
import statistics
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from openai import AsyncOpenAI

from pools.engine.config import parse_config
from pools.engine.events import EventKind, PoolEvent
from pools.engine.intervals import percentile
from pools.engine.registry import PoolRegistry

if TYPE_CHECKING:
    from http.server import BaseHTTPRequestHandler

    from pools.simulator.responders import ChatRequest

MESSAGES = [{"role": "user", "content": "Say hello in a few words."}]


@dataclass
class BenchmarkReport:
    rounds: int
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    first_call_ms: dict[str, list[float]] = field(default_factory=dict)
    acquire_release_us: list[float] = field(default_factory=list)
    slot_acquire_release_us: list[float] = field(default_factory=list)
    redis_acquire_release_us: list[float] = field(default_factory=list)
    connections: dict[str, int] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.latencies_ms[name])

    def p90(self, name: str) -> float:
        value = percentile(self.latencies_ms[name], 90)
        if value is None:  # as `median` refuses an empty list
            raise statistics.StatisticsError(f"no latencies for {name}")
        return value

    def summary(self) -> dict[str, Any]:
        variants = {
            name: {
                "median_ms": round(self.median(name), 3),
                "p90_ms": round(self.p90(name), 3),
                "calls": len(values),
            }
            for name, values in self.latencies_ms.items()
        }
        pooled = self.median("pooled")
        first = {
            name: round(statistics.median(values), 3) for name, values in self.first_call_ms.items()
        }
        acquire = statistics.median(self.acquire_release_us)
        checks = {
            "pooled_vs_reused": (round(pooled / self.median("reused"), 3), "<=", 1.05),
            "fresh_vs_pooled": (round(self.median("fresh") / pooled, 3), ">=", 2.0),
            "first_call_vs_steady": (round(first["pooled"] / pooled, 3), "<=", 1.2),
            "acquire_release_us": (round(acquire, 3), "<", 20.0),
        }
        if self.redis_acquire_release_us:
            redis_median = statistics.median(self.redis_acquire_release_us)
            checks["redis_extra_us"] = (round(redis_median - acquire, 1), "<", 1000.0)
        return {
            "rounds": self.rounds,
            "redis_acquire_release_median_us": round(
                statistics.median(self.redis_acquire_release_us), 1
            )
            if self.redis_acquire_release_us
            else None,
            "variants": variants,
            "first_call_after_warm_up_ms": first,
            "acquire_release_median_us": round(acquire, 3),
            "slot_only_acquire_release_median_us": round(
                statistics.median(self.slot_acquire_release_us), 3
            ),
            "connections_opened": self.connections,
            "targets": {
                name: {"value": value, "target": f"{op} {limit}", "met": _meets(value, op, limit)}
                for name, (value, op, limit) in checks.items()
            },
        }


def _meets(value: float, op: str, limit: float) -> bool:
    return {"<=": value <= limit, ">=": value >= limit, "<": value < limit}[op]


def trusting(ca_file: str) -> ssl.SSLContext | bool:
    """What an httpx client verifies with: the simulator's CA, or the defaults without one."""
    return ssl.create_default_context(cafile=ca_file) if ca_file else True


def bare_sdk(base_url: str, ca_file: str) -> AsyncOpenAI:
    """The SDK as one would use it without a pool: its own httpx client, no retries."""
    return AsyncOpenAI(
        base_url=base_url,
        api_key="benchmark",
        http_client=httpx.AsyncClient(verify=trusting(ca_file)),
        max_retries=0,
    )


class _OriginalPool:
    """The original design: N exclusive SDK objects, each with its own HTTP client.

    Its warm-up builds the objects and opens no connection; the lowest free slot wins.
    """

    def __init__(self, base_url: str, ca_file: str, size: int) -> None:
        self._free = list(range(size))
        self._clients = [bare_sdk(base_url, ca_file) for _ in range(size)]

    async def call(self, model: str) -> None:
        self._free.sort()
        slot = self._free.pop(0)
        try:
            await _complete(self._clients[slot], model)
        finally:
            self._free.append(slot)

    async def aclose(self) -> None:
        for client in self._clients:
            await client.close()


async def _complete(client: AsyncOpenAI, model: str) -> None:
    completion = await client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=8, temperature=0.7
    )
    assert completion.choices[0].message.content


def build_registry(
    base_url: str, ca_file: str, size: int, redis_url: str | None = None
) -> PoolRegistry:
    raw: dict[str, Any] = {
        "ENDPOINT": {"SIMULATOR_URL": base_url, "CA_BUNDLE": ca_file},
        "POOLS": {"main": {"MODEL": "gpt-4o", "SIZE": size}},
    }
    if redis_url:
        raw["CLUSTER"] = {"REDIS_URL": redis_url, "PREFIX": "carlos-benchmark"}
    return PoolRegistry(parse_config(raw))


async def _timed(call: Callable[[], Awaitable[None]]) -> float:
    started = time.perf_counter()
    await call()
    return (time.perf_counter() - started) * 1000


async def run_benchmark(
    base_url: str,
    ca_file: str,
    *,
    rounds: int = 200,
    first_call_trials: int = 15,
    size: int = 10,
    acquire_iterations: int = 20_000,
    seed: int = 7,
    redis_url: str | None = None,
) -> BenchmarkReport:
    """Run every variant `rounds` times, interleaved, plus the warm-up and overhead probes."""
    report = BenchmarkReport(rounds=rounds)
    shuffle = random.Random(seed).shuffle
    model = "gpt-4o"
    async with AsyncExitStack() as stack:
        registry = build_registry(base_url, ca_file, size)
        stack.push_async_callback(registry.close)
        await registry.initialize()
        reused = bare_sdk(base_url, ca_file)
        stack.push_async_callback(reused.close)
        original = _OriginalPool(base_url, ca_file, size)
        stack.push_async_callback(original.aclose)

        async def pooled() -> None:
            async with registry.get_main_llm() as llm:
                await llm.ainvoke(MESSAGES, max_tokens=8)

        async def fresh() -> None:
            async with bare_sdk(base_url, ca_file) as client:
                await _complete(client, model)

        variants: dict[str, Callable[[], Awaitable[None]]] = {
            "pooled": pooled,
            "fresh": fresh,
            "reused": lambda: _complete(reused, model),
            "original": lambda: original.call(model),
        }
        # The first call of each variant after its own warm-up, then the steady state.
        report.first_call_ms["original"] = [await _timed(variants["original"])]
        for name in ("reused", "pooled"):
            await variants[name]()
        report.latencies_ms = {name: [] for name in variants}
        order = list(variants)
        for _ in range(rounds):
            shuffle(order)
            for name in order:
                report.latencies_ms[name].append(await _timed(variants[name]))
        report.connections = {
            "pooled": registry.stats().http.connections_num,
            "fresh": rounds,
        }

    report.first_call_ms["pooled"] = [
        await _first_call_after_warm_up(base_url, ca_file, size) for _ in range(first_call_trials)
    ]

    report.acquire_release_us, report.slot_acquire_release_us = await _acquire_overhead(
        base_url, ca_file, acquire_iterations
    )
    if redis_url:
        report.redis_acquire_release_us, _ = await _acquire_overhead(
            base_url, ca_file, acquire_iterations // 4, redis_url
        )
    return report


async def _first_call_after_warm_up(base_url: str, ca_file: str, size: int) -> float:
    """A new registry, warmed, then one timed call: what the first user request sees."""
    registry = build_registry(base_url, ca_file, size)
    try:
        await registry.initialize()

        async def first() -> None:
            async with registry.get_main_llm() as llm:
                await llm.ainvoke(MESSAGES, max_tokens=8)

        return await _timed(first)
    finally:
        await registry.close()


async def _acquire_overhead(
    base_url: str, ca_file: str, iterations: int, redis_url: str | None = None
):
    """Microseconds for one uncontended acquire + release: the public path and the slot core."""
    registry = build_registry(base_url, ca_file, 10, redis_url)
    try:
        async with registry.get_main_llm():  # builds this loop's clients once
            pass
        full: list[float] = []
        for _ in range(iterations):
            started = time.perf_counter_ns()
            async with registry.get_main_llm():
                pass
            full.append((time.perf_counter_ns() - started) / 1000)
        pool = registry.pools["main"]
        core: list[float] = []
        for _ in range(iterations):
            started = time.perf_counter_ns()
            pool.release(await pool.acquire())
            core.append((time.perf_counter_ns() - started) / 1000)
        return full, core
    finally:
        await registry.close()


def format_report(summary: dict[str, Any]) -> str:
    """A plain-text table for the terminal and the README."""
    lines = [
        f"Interleaved rounds: {summary['rounds']} (each variant once per round, shuffled)",
        "",
        f"{'variant':<10} {'median ms':>10} {'p90 ms':>10} {'vs pooled':>10}",
    ]
    pooled = summary["variants"]["pooled"]["median_ms"]
    for name, row in summary["variants"].items():
        lines.append(
            f"{name:<10} {row['median_ms']:>10.2f} {row['p90_ms']:>10.2f} "
            f"{row['median_ms'] / pooled:>9.2f}x"
        )
    first = summary["first_call_after_warm_up_ms"]
    lines += [
        "",
        f"first call after warm-up: pooled {first['pooled']:.2f} ms, "
        f"original {first['original']:.2f} ms (steady pooled {pooled:.2f} ms)",
        f"acquire + release (uncontended, median): {summary['acquire_release_median_us']:.2f} µs "
        f"via `async with pool.get_main_llm()`, "
        f"{summary['slot_only_acquire_release_median_us']:.2f} µs slot accounting alone",
        f"connections opened: {summary['connections_opened']}",
    ]
    if summary["redis_acquire_release_median_us"] is not None:
        lines.append(
            f"acquire + release with Redis coordination (median): "
            f"{summary['redis_acquire_release_median_us']:.1f} µs, of which Redis adds "
            f"{summary['targets']['redis_extra_us']['value']:.1f} µs (two round trips)"
        )
    lines += [
        "",
        "targets:",
    ]
    for name, check in summary["targets"].items():
        mark = "met" if check["met"] else "MISSED"
        lines.append(f"  {name:<22} {check['value']:>9}  target {check['target']:<8} {mark}")
    return "\n".join(lines)


# -- pooled against one reused client, at zero emulated delay -----------------------------------
async def _pooled_against_reused(
    base_url: str, ca_file: str, rounds: int, size: int, seed: int
) -> dict[str, float]:
    """Medians (ms) of a pooled call and of the same call on one reused SDK client, which no
    instrumentation sees, interleaved in shuffled pairs: the reused client is the control that
    drift on the machine moves alike."""
    shuffle = random.Random(seed).shuffle
    registry = build_registry(base_url, ca_file, size)
    reused = bare_sdk(base_url, ca_file)
    try:
        await registry.initialize()

        async def pooled() -> None:
            async with registry.get_main_llm() as llm:
                await llm.ainvoke(MESSAGES, max_tokens=8)

        variants: dict[str, Callable[[], Awaitable[None]]] = {
            "pooled": pooled,
            "reused": lambda: _complete(reused, "gpt-4o"),
        }
        for call in variants.values():  # warm: the first calls build clients and connections
            for _ in range(5):
                await call()
        latencies: dict[str, list[float]] = {name: [] for name in variants}
        order = list(variants)
        for _ in range(rounds):
            shuffle(order)
            for name in order:
                latencies[name].append(await _timed(variants[name]))
    finally:
        await reused.close()
        await registry.close()
    return {name: statistics.median(values) for name, values in latencies.items()}


async def run_zero_delay(
    endpoints: dict[str, tuple[str, str]], *, rounds: int = 200, size: int = 10, seed: int = 7
) -> dict[str, Any]:
    """One non-streamed call, pooled (`async with registry.get_main_llm()` and `ainvoke`)
    against the bare SDK with one reused client, interleaved, per transport: `endpoints`
    maps a name ("TLS", "HTTP") to a simulator's (base URL, CA file) with no emulated delay,
    where what the client itself does is not hidden behind the network's round trips."""
    rows = {}
    for name, (base_url, ca_file) in endpoints.items():
        medians = await _pooled_against_reused(base_url, ca_file, rounds, size, seed)
        pooled, sdk = medians["pooled"], medians["reused"]
        rows[name] = {
            "pooled_ms": round(pooled, 3),
            "sdk_ms": round(sdk, 3),
            "pooled_vs_sdk": round(pooled / sdk, 3),
            "extra_us": round((pooled - sdk) * 1000, 1),
        }
    return {
        "rounds": rounds,
        "transports": rows,
        "target": "pooled_vs_sdk <= 1.05",
        "observers": run_observer_cost(iterations=min(20_000, 100 * rounds)),
    }


def run_observer_cost(iterations: int = 20_000) -> dict[str, float]:
    """Microseconds a call spends in the event observers a server adds to the engine's own:
    the Prometheus metrics (`/metrics`) and the snapshots' interval recorder, each timed as
    a call emits (one ACQUIRED and one COMPLETED event), median of 20 batches. Not in the
    pooled figures, which measure the engine alone."""
    from pools.engine.intervals import IntervalRecorder
    from pools.engine.metrics import metrics_for

    registry = build_registry("http://127.0.0.1:9/v1", "", 1)  # opens nothing
    acquired = PoolEvent("main", EventKind.ACQUIRED, wait_ms=0.01)
    completed = PoolEvent("main", EventKind.COMPLETED, latency_ms=2.0, tokens_in=9, tokens_out=8)
    batch = max(1, iterations // 20)

    def per_call() -> float:
        batches = []
        for _ in range(20):
            started = time.perf_counter_ns()
            for _ in range(batch):
                registry.events.emit(acquired)
                registry.events.emit(completed)
            batches.append((time.perf_counter_ns() - started) / batch / 1000)
        return statistics.median(batches)

    engine = per_call()
    metrics_for(registry)
    metrics = per_call()
    IntervalRecorder(registry.pools).attach(registry.events)
    recorder = per_call()
    return {
        "prometheus_us": round(metrics - engine, 2),
        "interval_recorder_us": round(recorder - metrics, 2),
    }


def format_zero_delay(summary: dict[str, Any]) -> str:
    lines = [
        f"Zero emulated delay, one non-streamed call, {summary['rounds']} interleaved rounds: "
        "pooled (`async with pool.get_main_llm()` + `ainvoke`) vs the bare SDK with one "
        "reused client",
        "",
        f"{'transport':<10} {'pooled ms':>10} {'SDK ms':>10} {'pooled/SDK':>11} "
        f"{'extra µs':>9}  target <= 1.05",
    ]
    for name, row in summary["transports"].items():
        mark = "met" if row["pooled_vs_sdk"] <= 1.05 else "MISSED"
        lines.append(
            f"{name:<10} {row['pooled_ms']:>10.3f} {row['sdk_ms']:>10.3f} "
            f"{row['pooled_vs_sdk']:>11.3f} {row['extra_us']:>+9.0f}  {mark}"
        )
    observers = summary.get("observers")
    if observers:
        lines += [
            "",
            "Not in these figures: the event observers a server adds to every call, "
            f"{observers['prometheus_us']:.1f} µs for the Prometheus metrics and "
            f"{observers['interval_recorder_us']:.1f} µs for the snapshots' interval recorder",
        ]
    return "\n".join(lines)


# -- client CPU per streamed chunk ---------------------------------------------------------------
def long_answer(request: ChatRequest) -> str:
    """The simulator's responder for the streaming figures (`--responder`): `max_tokens`
    short words, so a stream carries exactly that many chunks of text."""
    return "".join(f" word{index % 97}" for index in range(request.max_tokens or 2000))


STREAM_VARIANTS = {
    "pooled": "pooled `astream`",
    "sdk": "SDK streaming (`stream=True`)",
    "httpx_lines": "bare httpx, SSE lines only",
}


async def run_stream_cpu(
    base_url: str,
    ca_file: str,
    *,
    rounds: int = 20,
    tokens: int = 2000,
    size: int = 10,
    seed: int = 7,
) -> dict[str, Any]:
    """The client's CPU per chunk of a long stream (process CPU time over the stream, over
    its chunks), for a pooled stream, the SDK's streaming and bare httpx reading SSE lines,
    each once per round in a shuffled order. The endpoint is a simulator answering with
    `long_answer` as fast as it can; it runs in another process, so its CPU is not counted."""
    shuffle = random.Random(seed).shuffle
    request = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": tokens}
    registry = build_registry(base_url, ca_file, size)
    sdk = bare_sdk(base_url, ca_file)
    lines_client = httpx.AsyncClient(
        verify=trusting(ca_file), headers={"Authorization": "Bearer benchmark"}
    )
    try:
        await registry.initialize()

        async def pooled() -> int:
            async with registry.get_main_llm() as llm:
                return len([text async for text in llm.astream(MESSAGES, max_tokens=tokens)])

        async def sdk_stream() -> int:
            stream = await sdk.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, max_tokens=tokens, stream=True
            )
            chunks = 0
            async for chunk in stream:
                chunks += bool(chunk.choices and chunk.choices[0].delta.content)
            return chunks

        async def httpx_lines() -> int:
            body = {**request, "stream": True}
            chunks = 0
            async with lines_client.stream(
                "POST", f"{base_url}/chat/completions", json=body
            ) as response:
                async for line in response.aiter_lines():
                    chunks += line.startswith("data: {")
            return chunks

        variants: dict[str, Callable[[], Awaitable[int]]] = {
            "pooled": pooled,
            "sdk": sdk_stream,
            "httpx_lines": httpx_lines,
        }
        for read in variants.values():  # warm: connections, imports, caches
            await read()
        per_chunk: dict[str, list[float]] = {name: [] for name in variants}
        chunks: dict[str, int] = {}
        order = list(variants)
        for _ in range(rounds):
            shuffle(order)
            for name in order:
                started = time.process_time()
                chunks[name] = await variants[name]()
                per_chunk[name].append((time.process_time() - started) / chunks[name] * 1e6)
    finally:
        await lines_client.aclose()
        await sdk.close()
        await registry.close()
    return {
        "rounds": rounds,
        "variants": {
            name: {
                "cpu_us_per_chunk": round(statistics.median(values), 2),
                "chunks_per_stream": chunks[name],
            }
            for name, values in per_chunk.items()
        },
    }


def format_stream_cpu(summary: dict[str, Any]) -> str:
    variants = summary["variants"]
    lines = [
        f"Streaming, the client's CPU per chunk (process CPU time over a stream of "
        f"{variants['pooled']['chunks_per_stream']} chunks, median of {summary['rounds']} "
        "interleaved rounds, zero emulated delay, TLS)",
        "",
        f"{'variant':<32} {'CPU µs/chunk':>13} {'vs pooled':>10}",
    ]
    pooled = variants["pooled"]["cpu_us_per_chunk"]
    for name, row in variants.items():
        lines.append(
            f"{STREAM_VARIANTS[name]:<32} {row['cpu_us_per_chunk']:>13.2f} "
            f"{row['cpu_us_per_chunk'] / pooled:>9.2f}x"
        )
    return "\n".join(lines)


# -- telemetry overhead ------------------------------------------------------------------------
async def run_telemetry_overhead(
    base_url: str,
    ca_file: str,
    enable: Callable[[], Any],
    *,
    rounds: int = 400,
    size: int = 10,
    seed: int = 7,
) -> dict[str, Any]:
    """What exporting telemetry costs a pooled call: pooled against reused (the control),
    first with telemetry off (the API's no-ops), then after `enable()` has set up the SDK and
    its exporters. The overhead is the pooled/reused ratio with telemetry on over the ratio
    with it off, so that drift between the two phases cancels out."""
    off = await _pooled_against_reused(base_url, ca_file, rounds, size, seed)
    enable()
    on = await _pooled_against_reused(base_url, ca_file, rounds, size, seed + 1)
    ratio_off = off["pooled"] / off["reused"]
    ratio_on = on["pooled"] / on["reused"]
    overhead = ratio_on / ratio_off - 1
    return {
        "rounds": rounds,
        "off": {name: round(value, 3) for name, value in off.items()},
        "on": {name: round(value, 3) for name, value in on.items()},
        "pooled_vs_reused_off": round(ratio_off, 4),
        "pooled_vs_reused_on": round(ratio_on, 4),
        "overhead": round(overhead, 4),
        "overhead_us_per_call": round((ratio_on - ratio_off) * on["reused"] * 1000, 1),
        "target": {"value": round(overhead, 4), "target": "<= 0.05", "met": overhead <= 0.05},
    }


def format_telemetry_overhead(summary: dict[str, Any]) -> str:
    off, on = summary["off"], summary["on"]
    lines = [
        f"Telemetry overhead, {summary['rounds']} interleaved rounds per phase "
        "(pooled call vs one reused SDK client, which no instrumentation sees):",
        "",
        f"{'telemetry':<10} {'pooled ms':>10} {'reused ms':>10} {'pooled/reused':>14}",
        f"{'off':<10} {off['pooled']:>10.3f} {off['reused']:>10.3f} "
        f"{summary['pooled_vs_reused_off']:>14.3f}",
        f"{'on':<10} {on['pooled']:>10.3f} {on['reused']:>10.3f} "
        f"{summary['pooled_vs_reused_on']:>14.3f}",
        "",
        f"overhead per pooled call: {summary['overhead'] * 100:+.1f} % "
        f"({summary['overhead_us_per_call']:+.0f} µs); target <= 5 %: "
        + ("met" if summary["target"]["met"] else "MISSED"),
    ]
    export = summary.get("export")
    if export:
        lines.append(
            f"exported to {export['endpoint']}: {export['spans_exported']} spans, "
            f"{export['spans_dropped']} dropped, {export['spans_failed']} failed; "
            f"the sink received {export['sink']['spans']} spans in "
            f"{export['sink']['requests']} requests"
        )
    return "\n".join(lines)


SINK_READY = "OTLP sink listening on "


def reply_ok(handler: BaseHTTPRequestHandler, content: bytes, kind: str) -> None:
    """Answer 200 with `content` of type `kind`, its length given so the connection stays
    open (the HTTP/1.1 handlers of a test receiver or sink)."""
    handler.send_response(200)
    handler.send_header("Content-Type", kind)
    handler.send_header("Content-Length", str(len(content)))
    handler.end_headers()
    handler.wfile.write(content)


def serve_otlp_sink() -> None:
    """A minimal OTLP/HTTP collector for the benchmark, run in a child process (so its work
    is not on the measured process's CPU): it accepts every export, counts the spans and
    requests, and says so at GET /stats."""
    import json
    import sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    counts = {"requests": 0, "spans": 0, "bytes": 0}

    class Sink(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            counts["requests"] += 1
            counts["bytes"] += len(body)
            if self.path.endswith("/v1/traces"):
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                counts["spans"] += sum(
                    len(scope.spans)
                    for resource in request.resource_spans
                    for scope in resource.scope_spans
                )
            reply_ok(self, b"", "application/x-protobuf")

        def do_GET(self) -> None:
            reply_ok(self, json.dumps(counts).encode(), "application/json")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    sys.stdout.write(f"{SINK_READY}http://127.0.0.1:{server.server_address[1]}\n")
    sys.stdout.flush()
    server.serve_forever()
