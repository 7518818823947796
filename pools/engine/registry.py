"""The pool engine's front door: named pools, per-loop clients, warm-up, stats, shutdown.

`PoolRegistry` is plain asyncio and knows nothing of Django. Slot accounting is shared by
the whole process; HTTP and SDK clients belong to the event loop that created them, because
an `httpx.AsyncClient` must never be used from another loop. Building a registry opens
nothing: connections are opened by `initialize()` (warm-up) or by the first call.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import httpcore
import httpx
from openai import AsyncAzureOpenAI, AsyncOpenAI

from pools.engine import telemetry
from pools.engine.adaptive import DeploymentLimiter
from pools.engine.admission import (
    Refusal,
    close_connection,
    deployment_unready,
    limit_settings,
    refusal_for,
    take_lease,
)
from pools.engine.budget import RateBudget
from pools.engine.config import PoolsConfig
from pools.engine.events import EventBus, EventKind, PoolEvent
from pools.engine.exceptions import PoolClosed, PoolError, UnknownPool
from pools.engine.handle import Guard, LLMHandle
from pools.engine.resilience import BreakerState, CircuitBreaker, RetryPolicy
from pools.engine.slots import Slot, SlotPool
from pools.engine.stats import (
    BreakerStats,
    BudgetStats,
    ClusterStats,
    DeploymentStats,
    EndpointStats,
    HttpStats,
    PoolStats,
    RegistryStats,
)
from pools.engine.transport import (
    ConnectionLedger,
    build_http_client,
    current_pool,
    http_timeout,
    live_connections,
    open_idle_connections,
)

if TYPE_CHECKING:
    import httpx2

    from pools.engine.cluster import ClusterCoordinator, Lease

logger = logging.getLogger("pools")

# One retry layer: the pool's (pools.engine.handle), so the SDK must not retry on its own.
SDK_MAX_RETRIES = 0
CLOSE_OTHER_LOOP_TIMEOUT_S = 5.0


# Warm stays warm: how often idle connections are checked, how many are opened at once, and
# at most how many replacements per minute, as a multiple of the pools' total size.
KEEP_WARM_INTERVAL_S = 1.0
KEEP_WARM_PARALLEL = 4
KEEP_WARM_PER_MINUTE = 2
# A start-up outage: the endpoint is probed again after 1 s, doubling up to 30 s.
REPROBE_FIRST_S = 1.0
REPROBE_MAX_S = 30.0
# What opening connections raises when the endpoint cannot be reached.
UNREACHABLE = (httpx.HTTPError, httpcore.NetworkError, httpcore.TimeoutException, OSError)
# The name prefix of the pools' own background tasks (keeping warm, re-probing).
POOL_UPKEEP = "pools-upkeep"


@dataclass(eq=False)
class _LoopClients:
    """The clients of one event loop, and the background work that keeps them warm."""

    http: httpx.AsyncClient
    sdk: AsyncOpenAI
    lock: asyncio.Lock
    warmed: dict[str, int] | None = None
    tasks: set[asyncio.Task] = field(default_factory=set)


async def _close_clients(clients: _LoopClients) -> None:
    for task in list(clients.tasks):
        task.cancel()
    await asyncio.gather(*clients.tasks, return_exceptions=True)
    await clients.http.aclose()
    await clients.sdk.close()


class PoolRegistry:
    """Every named pool of the process, as configured by one `PoolsConfig`."""

    def __init__(self, config: PoolsConfig) -> None:
        self._config = config
        self.ledger = ConnectionLedger()
        self.events = EventBus()
        resilience = config.resilience
        policy = RetryPolicy(
            backoff_base=resilience.backoff_base,
            backoff_max=resilience.backoff_max,
            retry_after_cap=resilience.retry_after_cap,
        )
        # One breaker per upstream deployment: pools on the same model share its health.
        self.breakers: dict[str, CircuitBreaker] = {}
        for pool in config.pools.values():
            if pool.model not in self.breakers:
                self.breakers[pool.model] = CircuitBreaker(
                    pool.model,
                    failures_to_open=resilience.breaker_failures,
                    failure_rate=resilience.breaker_failure_rate,
                    window=resilience.breaker_window,
                    cooldown=resilience.breaker_cooldown,
                )
        self.cluster: ClusterCoordinator | None = None
        if config.cluster is not None:
            from pools.engine.cluster import ClusterCoordinator  # needs redis only when configured

            self.cluster = ClusterCoordinator(config.cluster)
            self.cluster.stats_provider = self._instance_stats
            for model, breaker in self.breakers.items():
                breaker.on_change = self._breaker_listener(model)
        # With a cluster, every instance spends from the same buckets in Redis.
        self.budgets: dict[str, RateBudget] = {
            model: RateBudget(
                model,
                limit.rpm,
                limit.tpm,
                max_wait=resilience.rate_limit_max_wait,
                shared=self.cluster,
            )
            for model, limit in config.rate_limits.items()
        }
        # One limiter per deployment: its 429 pause and learned concurrency limit (with a
        # cluster, shared by every instance through Redis).
        self.limiters: dict[str, DeploymentLimiter] = {
            model: DeploymentLimiter(model, limit_settings(config, model), shared=self.cluster)
            for model in self.breakers
        }
        if self.cluster is not None:
            self.cluster.deployments = list(self.limiters)
        self._background: set[asyncio.Task] = set()
        self.events.subscribe(self._clear_warmup_error)
        self._guards = {
            name: Guard(
                policy,
                self.breakers[pool.model],
                self.events,
                self.budgets.get(pool.model),
                resilience.default_output_tokens,
                limiter=self.limiters[pool.model],
                adaptive=pool.adaptive,
            )
            for name, pool in config.pools.items()
        }
        self.pools: dict[str, SlotPool] = {
            name: SlotPool(pool, config.http.max_connections) for name, pool in config.pools.items()
        }
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClients] = (
            weakref.WeakKeyDictionary()
        )
        self._loops_lock = threading.Lock()
        self._initialized = False
        self._closed = False
        self.warmup_error: str | None = None
        # Set by the server when it begins to stop: readiness fails, so a load balancer
        # sends no new work here while the running calls finish.
        self.stopping = False
        self._cluster_waiting: Counter[str] = Counter()
        # The pools' gauges and counters as OpenTelemetry instruments, and errors by kind.
        telemetry.watch_registry(self)

    @property
    def config(self) -> PoolsConfig:
        return self._config

    @property
    def keepalive_connections(self) -> int:
        """Idle connections kept open: the configured limit, raised so every slot stays warm."""
        return max(self._config.http.max_keepalive_connections, self._config.total_slots)

    # -- the design note's API -------------------------------------------------------------
    def get_main_llm(self, timeout: float | None = None) -> AbstractAsyncContextManager[LLMHandle]:
        return self.acquire("main", timeout)

    def get_ronei_llm(self, timeout: float | None = None) -> AbstractAsyncContextManager[LLMHandle]:
        return self.acquire("ronei", timeout)

    def get_mini_llm(self, timeout: float | None = None) -> AbstractAsyncContextManager[LLMHandle]:
        return self.acquire("mini", timeout)

    def acquire(
        self, name: str, timeout: float | None = None
    ) -> AbstractAsyncContextManager[LLMHandle]:
        """Hold one slot of pool `name` for the block; released on any exit, even cancellation.

        Taken in this order and given back in the reverse: the slot, the cluster-wide lease,
        the handle's connection, the pool's name for the connections opened in the block.
        A class (`_Held`) with one helper per concern: this runs on every call, and an exit
        stack, or a generator-based context manager (about 12 µs on the 2-core machine
        against 0.5 µs for a class), costs it several times over (benchmark_pools).
        """
        return _Held(self, name, timeout)

    def _open_pool(self, name: str) -> SlotPool:
        pool = self.pools.get(name)
        if pool is None:
            raise UnknownPool(f"no pool named {name!r}; configured: {sorted(self.pools)}")
        if self._closed:
            raise PoolClosed("the pool engine is closed")
        return pool

    async def _admit(
        self, pool: SlotPool, breaker: CircuitBreaker, timeout: float | None
    ) -> tuple[Slot, Lease | None]:
        """The breaker's consent, a slot, a cluster lease. A refusal (`PoolError`) gives back
        what was taken, then is published as REFUSED."""
        try:
            breaker.check()  # fail fast while the upstream cools down: hold no slot
            slot = await pool.acquire(timeout)
            if self.cluster is None:
                return slot, None
            try:
                lease = await take_lease(self.cluster, pool, slot, timeout, self._cluster_waiting)
            except BaseException:
                pool.release(slot)
                raise
            return slot, lease
        except PoolError as exc:
            self.events.emit(PoolEvent(pool.name, EventKind.REFUSED, error=type(exc).__name__))
            raise

    async def _give_back(self, pool: SlotPool, slot: Slot, lease: Lease | None) -> None:
        """The cluster lease, then the slot: the slot is given back even if Redis fails."""
        try:
            if lease is not None and self.cluster is not None:
                await self.cluster.release(lease)
        finally:
            pool.release(slot)

    def _breaker_listener(self, model: str) -> Callable[[BreakerState, float, str], None]:
        """Publish a local breaker's opening and closing to the other instances."""

        def changed(state: BreakerState, seconds: float, reason: str) -> None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            cluster = self.cluster
            if cluster is None:
                return
            if state is BreakerState.OPEN:
                work = cluster.publish_open(model, seconds, reason)
            else:
                work = cluster.publish_closed(model)
            task = loop.create_task(work)
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        return changed

    def _instance_stats(self) -> dict[str, Any]:
        """What this instance reports to the cluster (`/health?scope=cluster`), as JSON."""
        stats = self.stats().as_json()
        return {"pools": stats["pools"], "http": stats["http"], "at": time.time()}

    async def cluster_stats(self) -> dict[str, Any]:
        """The whole cluster as the instances last reported it (needs REDIS_URL)."""
        if self.cluster is None:
            raise PoolError("cluster scope needs REDIS_URL")
        return await self.cluster.cluster_stats()

    # -- lifecycle ---------------------------------------------------------------------------
    async def initialize(self) -> dict[str, int]:
        """Open every slot's connection on this loop; a second call changes nothing."""
        clients = self._clients()
        async with clients.lock:
            if clients.warmed is not None:
                return clients.warmed
            for pool in self.pools.values():
                pool.reopen()
            self._closed = False
            logger.info("🔥 Warming up LLM connection pools...")
            started = time.perf_counter()
            before = {name: self.ledger.for_pool(name)["connections_num"] for name in self.pools}
            try:
                await self._open_connections(clients.http)
                self.warmup_error = None
            except UNREACHABLE as exc:
                self.warmup_error = f"{type(exc).__name__}: {exc}"
                logger.error(
                    "❌ Warm-up could not reach the LLM endpoint %s (%s); calls will connect "
                    "on first use, and the endpoint is probed again in the background. Check "
                    "the endpoint URL, the API key and the network.",
                    self._config.endpoint.public_url,
                    self.warmup_error,
                )
                self._background_on(clients, self._reprobe(clients), "reprobe")
            self._background_on(clients, self._keep_warm(clients), "keep-warm")
            opened = {
                name: self.ledger.for_pool(name)["connections_num"] - before[name]
                for name in self.pools
            }
            clients.warmed = opened
            self._initialized = True
            if self.cluster is not None:
                await self.cluster.start()
            if self.warmup_error is None:
                logger.info(
                    "✅ Connection pool ready: %s (%.0f ms)",
                    ", ".join(f"{count} {name}" for name, count in opened.items()),
                    (time.perf_counter() - started) * 1000,
                )
            else:  # never "ready: 0 main" right after saying the endpoint was unreachable
                logger.warning("⚠️ Pools started cold: unready until the endpoint answers")
            logger.info(
                "🌐 HTTP connection pool initialized: %s, max_connections=%d, "
                "max_keepalive_connections=%d",
                self._config.endpoint.public_url,
                self._config.http.max_connections,
                self.keepalive_connections,
            )
            return opened

    async def _open_connections(self, http: httpx.AsyncClient) -> None:
        """One request to check the endpoint and key, then a connection per slot, idle.

        The slots' connections are opened without requests (TCP and TLS only), so warm-up
        spends one request of the endpoint's quota, not one per slot.
        """
        url, headers = self._probe_request()
        names = list(self.pools)
        current_pool.set(names[0])
        response = await http.get(url, headers=headers)
        if response.status_code in (401, 403):
            logger.error("❌ The LLM endpoint refused the API key during warm-up (HTTP 401/403)")
        elif response.status_code == 404:
            logger.error(
                "❌ The LLM endpoint answered 404 to %s during warm-up: is the base URL missing "
                "its API path (for example /v1)?",
                self._config.endpoint.public_url,
            )
        timeout = self._config.http.connect_timeout
        for name in names:
            current_pool.set(name)
            missing = self.pools[name].config.size - (name == names[0])
            if missing > 0:
                await open_idle_connections(http, url, missing, timeout)

    def _background_on(self, clients: _LoopClients, work: Any, name: str) -> None:
        """Run `work` on this loop until its clients close."""
        task = asyncio.get_running_loop().create_task(work, name=f"{POOL_UPKEEP}-{name}")
        clients.tasks.add(task)
        task.add_done_callback(clients.tasks.discard)

    async def _reprobe(self, clients: _LoopClients) -> None:
        """After a start-up outage, probe the endpoint with backoff until it answers (one
        request per probe), so readiness clears by itself."""
        delay = REPROBE_FIRST_S
        while self.warmup_error and not self._closed:
            await asyncio.sleep(delay * (0.5 + 0.5 * random.random()))
            try:
                await self._open_connections(clients.http)
            except UNREACHABLE as exc:
                self.warmup_error = f"{type(exc).__name__}: {exc}"
                delay = min(REPROBE_MAX_S, delay * 2)
                continue
            self.warmup_error = None
            logger.info(
                "✅ The LLM endpoint %s answers again: pools warm",
                self._config.endpoint.public_url,
            )

    async def _keep_warm(self, clients: _LoopClients) -> None:
        """Replace, in the background, the idle connections the server closed (uvicorn after
        5 s, load balancers after minutes), up to the pools' size: the next call after a quiet
        spell pays no handshake. Bounded: a few at a time, a budget per minute, jittered."""
        target = self._config.total_slots
        url, _ = self._probe_request()
        loop = asyncio.get_running_loop()
        window_started, replaced = loop.time(), 0
        while not self._closed:
            await asyncio.sleep(KEEP_WARM_INTERVAL_S * (0.75 + 0.5 * random.random()))
            if self.warmup_error:
                continue  # the re-probe is in charge until the endpoint answers
            if loop.time() - window_started >= 60:
                window_started, replaced = loop.time(), 0
            missing = min(
                target - await live_connections(clients.http),
                KEEP_WARM_PARALLEL,
                KEEP_WARM_PER_MINUTE * target - replaced,
            )
            if missing <= 0:
                continue
            # Attribute each replacement to the pool that lost most of its own.
            short = sorted(
                self.pools,
                key=lambda name: self.ledger.open_for(name) - self.pools[name].config.size,
            )
            for name in short[:missing]:
                current_pool.set(name)
                try:
                    await open_idle_connections(
                        clients.http, url, 1, self._config.http.connect_timeout
                    )
                except (httpcore.NetworkError, httpcore.TimeoutException, OSError):
                    break  # the endpoint is away: the next round tries again
                finally:
                    replaced += 1

    def _probe_request(self) -> tuple[str, dict[str, str]]:
        endpoint = self._config.endpoint
        if endpoint.kind == "azure":
            url = f"{endpoint.base_url}/openai/models?api-version={endpoint.api_version}"
            return url, {"api-key": endpoint.api_key}
        return f"{endpoint.base_url}/models", {"Authorization": f"Bearer {endpoint.api_key}"}

    async def aclose_loop(self) -> None:
        """Close the clients of the running loop (a test's loop, or one made by async_to_sync)."""
        loop = asyncio.get_running_loop()
        with self._loops_lock:
            clients = self._loops.pop(loop, None)
        if clients is not None:
            await _close_clients(clients)
        if self.cluster is not None:
            await self.cluster.aclose_loop()

    async def close(self) -> None:
        """Shut down: refuse new calls, wake queued callers, close every client."""
        self._closed = True
        for pool in self.pools.values():
            pool.close()
        await self.aclose_loop()
        with self._loops_lock:
            others = list(self._loops.items())
            self._loops.clear()
        for loop, clients in others:
            if loop.is_closed() or not loop.is_running():
                continue
            # On their own loop, and waited for: a caller checking for open sockets after
            # close() must not race the closing.
            closing = asyncio.run_coroutine_threadsafe(_close_clients(clients), loop)
            try:
                await asyncio.wait_for(asyncio.wrap_future(closing), CLOSE_OTHER_LOOP_TIMEOUT_S)
            except (TimeoutError, RuntimeError, OSError) as exc:
                logger.warning("closing another loop's clients failed: %r", exc)
        logger.info("🛑 LLM connection pools closed")

    def resize(self, size: int) -> None:
        """Apply the global size knob to every pool without an explicit size."""
        self._config = self._config.with_size(size)
        for name, pool in self.pools.items():
            pool.reconfigure(self._config.pools[name])
        for model, limiter in self.limiters.items():
            limiter.settings = limit_settings(self._config, model)

    @property
    def initialized(self) -> bool:
        return self._initialized

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def usable(self) -> bool:
        return self._initialized and not self._closed

    @property
    def instance(self) -> str:
        """How snapshots, the admin and the cluster view name this process."""
        if self.cluster is not None:
            return self.cluster.instance
        return f"{socket.gethostname()}:{os.getpid()}"

    def breaker_for(self, pool_name: str) -> CircuitBreaker:
        return self._guards[pool_name].breaker

    def unavailable_reason(self) -> str | None:
        """Why the service should not take traffic now, or None (drives /health readiness).

        Every deployment a pool uses counts (a design needs them all): one whose circuit is
        open, or that is paused by a 429 for longer than its calls may wait, makes the
        service unready, with the reason per pool.
        """
        if self._closed:
            return "pools closed"
        if self.stopping:
            return "the server is stopping: it finishes what runs and takes no new work"
        if not self._initialized:
            return "pools not initialized"
        if self.warmup_error:
            return (
                f"the LLM endpoint could not be reached at warm-up ({self.warmup_error}); "
                "probing again in the background"
            )
        reasons = [
            reason
            for model, breaker in self.breakers.items()
            if (reason := deployment_unready(model, breaker, self.limiters[model], self.pools))
        ]
        return "; ".join(reasons) or None

    def refusal(self, pool_names: Iterable[str]) -> Refusal | None:
        """Why new work using the pools `pool_names` would be refused now, or None: the
        engine closed, or one pool's breaker, full queue or rate budget
        (`pools.engine.admission.refusal_for`)."""
        if self._closed:
            return Refusal("the pools are shut down")
        return refusal_for(
            pool_names,
            lambda name: self._pool_stats(name, pool) if (pool := self.pools.get(name)) else None,
            self.breaker_for,
            self._config.resilience,
        )

    def _clear_warmup_error(self, event: PoolEvent) -> None:
        """A call that succeeds proves the endpoint reachable after all."""
        if event.kind is EventKind.COMPLETED and self.warmup_error:
            self.warmup_error = None

    # -- clients per loop -----------------------------------------------------------------
    def _clients(self) -> _LoopClients:
        loop = asyncio.get_running_loop()
        clients = self._loops.get(loop)
        if clients is not None:
            return clients
        with self._loops_lock:
            clients = self._loops.get(loop)
            if clients is None:
                for stale in [other for other in self._loops if other.is_closed()]:
                    del self._loops[stale]
                http = self._build_http(
                    max_connections=self._config.http.max_connections,
                    keepalive=self.keepalive_connections,
                )
                clients = _LoopClients(http=http, sdk=self._build_sdk(http), lock=asyncio.Lock())
                self._loops[loop] = clients
            return clients

    def _build_http(self, *, max_connections: int, keepalive: int) -> httpx.AsyncClient:
        return build_http_client(
            self._config.endpoint,
            self._config.http,
            self.ledger,
            max_connections=max_connections,
            max_keepalive_connections=keepalive,
            on_response=self._observe_response if self.budgets else None,
        )

    async def _observe_response(self, response: httpx.Response) -> None:
        """Let the endpoint's x-ratelimit-remaining-* headers tighten the caller's budget."""
        guard = self._guards.get(current_pool.get())
        if guard is not None and guard.budget is not None:
            await guard.budget.observe(response.headers)

    def _build_sdk(self, http: httpx.AsyncClient) -> AsyncOpenAI:
        endpoint = self._config.endpoint
        # openai 3 annotates httpx2's client and timeout; httpx's, which the transport builds
        # on, are what it is given and work alike.
        client = _sdk_client(http)
        timeout = cast("httpx2.Timeout", http_timeout(self._config.http))
        if endpoint.kind == "azure":
            return AsyncAzureOpenAI(
                azure_endpoint=endpoint.base_url,
                api_key=endpoint.api_key,
                api_version=endpoint.api_version,
                http_client=client,
                timeout=timeout,
                max_retries=SDK_MAX_RETRIES,
            )
        return AsyncOpenAI(
            base_url=endpoint.base_url,
            api_key=endpoint.api_key,
            http_client=client,
            timeout=timeout,
            max_retries=SDK_MAX_RETRIES,
        )

    # -- stats --------------------------------------------------------------------------------
    def stats(self) -> RegistryStats:
        """Everything /health and the commands show; never a key or a credential."""
        http = self._config.http
        with self._loops_lock:
            loops = len(self._loops)
        return RegistryStats(
            initialized=self._initialized,
            closed=self._closed,
            endpoint=EndpointStats(
                kind=self._config.endpoint.kind, url=self._config.endpoint.public_url
            ),
            warmup_error=self.warmup_error,
            cluster=ClusterStats(**self.cluster.snapshot()) if self.cluster is not None else None,
            http=HttpStats(
                max_connections=http.max_connections,
                max_keepalive_connections=self.keepalive_connections,
                keepalive_expiry_s=http.keepalive_expiry,
                event_loops=loops,
                **self.ledger.totals(),
            ),
            pools={name: self._pool_stats(name, pool) for name, pool in self.pools.items()},
        )

    def _pool_stats(self, name: str, pool: SlotPool) -> PoolStats:
        guard = self._guards[name]
        budget = guard.budget
        return PoolStats.of(
            pool.stats(),
            **self.ledger.for_pool(name),
            cluster_waiting=self._cluster_waiting[name],
            breaker=BreakerStats(**guard.breaker.snapshot()),
            concurrency=DeploymentStats.from_json(
                {
                    **self.limiters[pool.config.model].snapshot(),
                    "pool_adaptive": pool.config.adaptive,
                }
            ),
            rate_budget=BudgetStats(**budget.snapshot()) if budget is not None else None,
        )


class _Held(AbstractAsyncContextManager[LLMHandle]):
    """One `async with registry.acquire(name)` block (`PoolRegistry.acquire`)."""

    __slots__ = (
        "_handle",
        "_lease",
        "_name",
        "_pool",
        "_registry",
        "_shared",
        "_slot",
        "_temporary",
        "_timeout",
        "_token",
    )

    def __init__(self, registry: PoolRegistry, name: str, timeout: float | None) -> None:
        self._registry, self._name, self._timeout = registry, name, timeout

    async def __aenter__(self) -> LLMHandle:
        registry, name = self._registry, self._name
        pool = self._pool = registry._open_pool(name)
        guard = registry._guards[name]
        slot, lease = await registry._admit(pool, guard.breaker, self._timeout)
        self._slot, self._lease = slot, lease
        try:
            registry.events.emit(
                PoolEvent(
                    name,
                    EventKind.ACQUIRED,
                    wait_ms=slot.wait_ms,
                    overflow=slot.overflow,
                    queued=slot.queued,
                )
            )
            shared = self._shared = registry._clients()
            sdk, temporary = shared.sdk, None
            if slot.overflow:
                temporary = registry._build_http(max_connections=1, keepalive=1)
                sdk = sdk.copy(http_client=_sdk_client(temporary))
            self._temporary = temporary
            self._handle = LLMHandle(pool, slot, sdk, guard)
        except BaseException:
            await registry._give_back(pool, slot, lease)
            raise
        self._token = current_pool.set(name)  # connections opened in the block count for it
        return self._handle

    async def __aexit__(self, exc_type: type[BaseException] | None, *details: object) -> None:
        try:
            current_pool.reset(self._token)
            failed = exc_type is not None  # a failure or a cancellation may strand a connection
            await close_connection(self._handle, self._temporary, self._shared.http, failed)
        finally:
            await self._registry._give_back(self._pool, self._slot, self._lease)


def _sdk_client(http: httpx.AsyncClient) -> httpx2.AsyncClient:
    """The client as openai 3's annotations name it (httpx2's); httpx's works alike."""
    return cast("httpx2.AsyncClient", http)
