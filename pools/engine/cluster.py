"""Cluster-wide pool capacity and shared upstream health, coordinated through Redis.

With several Carlos processes behind a load balancer, per-process limits multiply by the
number of processes. Here each pool's capacity (size plus overflow cap) is a cluster-wide
limit: a call holds a lease, a member of a Redis sorted set scored by its expiry, renewed
while the call runs; the leases of a process that dies (even `kill -9`) expire within the
lease time and the capacity comes back. The local slot pool stays in front as a fast bound,
and one Lua script per acquire (one round trip) also reports whether another process has
opened the deployment's circuit. Rate budgets (requests and tokens per minute) live in Redis
too, as token buckets refilled and spent atomically by a Lua script. If Redis cannot be
reached, the process falls back to its local limits after a short timeout, says so, and
resumes coordination when Redis returns.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pools.engine.budget import BucketLevels, BucketOperation
from pools.engine.config import ClusterConfig as ClusterSettings

logger = logging.getLogger("pools")

# KEYS[1] the pool's lease set, KEYS[2] the deployment's shared breaker.
# ARGV[1] capacity, ARGV[2] lease time in ms, ARGV[3] lease id.
# Returns {1} granted, {0} full, {-1, ms_left, reason} circuit open elsewhere.
_ACQUIRE = """
local open_ms = redis.call('PTTL', KEYS[2])
if open_ms > 0 then return {-1, open_ms, redis.call('GET', KEYS[2])} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
  return {1}
end
return {0}
"""

# KEYS: lease sets; ARGV[1] lease time in ms, then one lease id per key. Only renews leases
# that still exist (XX): an expired lease is gone for good.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl * 2)
end
return #KEYS
"""


# KEYS[1] the deployment's budget hash. ARGV: rpm, tpm, operation, requests, tokens.
# Refills both buckets from the time elapsed (Redis's clock, so every process agrees), applies
# the operation (see `pools.engine.budget.SharedBuckets`), and returns {wait_ms, requests, tokens}.
# A bucket idle for a minute is full again, so the hash may expire after that.
_BUDGET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local op, want_requests, want_tokens = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local saved = redis.call('HMGET', KEYS[1], 'requests', 'tokens', 'at')
local requests = tonumber(saved[1]) or rpm
local tokens = tonumber(saved[2]) or tpm
local minutes = math.max(0, now - (tonumber(saved[3]) or now)) / 60000
requests = math.min(rpm, requests + minutes * rpm)
tokens = math.min(tpm, tokens + minutes * tpm)
local wait = 0
if op == 'reserve' then
  if rpm > 0 and requests < 1 then wait = (1 - requests) / rpm * 60000 end
  local need = math.min(want_tokens, tpm)
  if tpm > 0 and tokens < need then wait = math.max(wait, (need - tokens) / tpm * 60000) end
  if wait == 0 then
    if rpm > 0 then requests = requests - 1 end
    if tpm > 0 then tokens = tokens - need end
  end
elseif op == 'settle' then
  tokens = math.min(tpm, tokens + want_tokens)
elseif op == 'observe' then
  if want_requests >= 0 then requests = math.min(requests, want_requests) end
  if want_tokens >= 0 then tokens = math.min(tokens, want_tokens) end
end
redis.call('HSET', KEYS[1], 'requests', tostring(requests), 'tokens', tostring(tokens),
  'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], 120000)
return {tostring(wait), tostring(requests), tostring(tokens)}
"""


# KEYS[1] the deployment's pause key. ARGV[1] pause in ms, ARGV[2] reason. Only extends.
_EXTEND_PAUSE = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
end
return 1
"""
# How often each instance reads the cluster's pauses and limits.
LIMIT_POLL_SECONDS = 0.25


@dataclass(eq=False)
class Lease:
    pool: str
    lease_id: str
    key: str
    coordinated: bool  # False when granted on local limits while Redis was unreachable


@dataclass(eq=False)
class _LoopState:
    client: aioredis.Redis
    acquire_script: Any  # EVALSHA with fallback: the script text is not resent every call
    renew_script: Any
    budget_script: Any
    pause_script: Any
    held: dict[str, Lease] = field(default_factory=dict)
    renewer: asyncio.Task | None = None
    watcher: asyncio.Task | None = None
    publishing: set[asyncio.Task] = field(default_factory=set)


class ClusterFull(Exception):
    """The cluster-wide capacity is taken; the caller may wait and try again."""


class ClusterCircuitOpen(Exception):
    def __init__(self, retry_after: float, reason: str) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.reason = reason


def instance_name() -> str:
    """Host and process id, plus a nonce: two registries of one process stay apart."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class ClusterCoordinator:
    """Redis leases for pool capacity, the shared breaker, and the cluster's instance list."""

    def __init__(self, settings: ClusterSettings, instance: str | None = None) -> None:
        self.settings = settings
        self.instance = instance or instance_name()
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._was_down = False
        # Called each renewal period; its result is what `/health?scope=cluster` shows.
        self.stats_provider: Callable[[], dict[str, Any]] | None = None
        self.redis_errors = 0
        self.last_error = ""
        self.leases_granted = 0
        self.local_fallbacks = 0
        # The cluster's learned limit (for all instances together) and pause per deployment,
        # as last read from Redis: {deployment: (limit, pause ends at (monotonic), reason)}.
        self._limits: dict[str, tuple[float, float, str]] = {}
        self.live_instances = 1
        self.deployments: list[str] = []  # whose limits the watcher reads

    # -- keys ---------------------------------------------------------------------------------
    def lease_key(self, pool: str) -> str:
        return f"{self.settings.prefix}:pool:{pool}:leases"

    def budget_key(self, deployment: str) -> str:
        return f"{self.settings.prefix}:budget:{deployment}"

    def breaker_key(self, deployment: str) -> str:
        return f"{self.settings.prefix}:breaker:{deployment}"

    def limit_key(self, deployment: str) -> str:
        return f"{self.settings.prefix}:limit:{deployment}"

    def pause_key(self, deployment: str) -> str:
        return f"{self.settings.prefix}:pause:{deployment}"

    def _instance_key(self, instance: str) -> str:
        return f"{self.settings.prefix}:instance:{instance}"

    @property
    def _instances_key(self) -> str:
        return f"{self.settings.prefix}:instances"

    # -- availability -------------------------------------------------------------------------
    @property
    def redis_available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _redis_failed(self, exc: BaseException) -> None:
        with self._lock:
            first = not self._was_down
            self._was_down = True
            self._down_until = time.monotonic() + self.settings.retry_redis_after
            self.redis_errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
        if first:
            logger.warning(
                "⚠️  Redis unreachable (%s): falling back to this process's local pool limits; "
                "retrying in %.0fs",
                self.last_error,
                self.settings.retry_redis_after,
            )

    def _redis_succeeded(self) -> None:
        if self._was_down:
            with self._lock:
                was_down, self._was_down = self._was_down, False
            if was_down:
                logger.info("✅ Redis reachable again: cluster coordination resumed")

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            client = aioredis.from_url(
                self.settings.url,
                socket_timeout=self.settings.redis_timeout,
                socket_connect_timeout=self.settings.redis_timeout,
                decode_responses=True,
            )
            state = _LoopState(
                client,
                client.register_script(_ACQUIRE),
                client.register_script(_RENEW),
                client.register_script(_BUDGET),
                client.register_script(_EXTEND_PAUSE),
            )
            self._loops[loop] = state
        return state

    # -- leases ---------------------------------------------------------------------------------
    async def acquire(self, pool: str, capacity: int, deployment: str) -> Lease:
        """One round trip: a lease, or `ClusterFull`, or `ClusterCircuitOpen`.

        While Redis is unreachable the lease is granted on local limits (`coordinated=False`).
        """
        lease_id = f"{self.instance}:{uuid.uuid4().hex[:12]}"
        key = self.lease_key(pool)
        if not self.redis_available:
            self.local_fallbacks += 1
            return Lease(pool, lease_id, key, coordinated=False)
        state = self._state()
        try:
            reply = await state.acquire_script(
                keys=[key, self.breaker_key(deployment)],
                args=[capacity, int(self.settings.lease_seconds * 1000), lease_id],
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self._redis_failed(exc)
            self.local_fallbacks += 1
            return Lease(pool, lease_id, key, coordinated=False)
        self._redis_succeeded()
        status = int(reply[0])
        if status == -1:
            raise ClusterCircuitOpen(int(reply[1]) / 1000, str(reply[2] or "opened elsewhere"))
        if status == 0:
            raise ClusterFull(pool)
        lease = Lease(pool, lease_id, key, coordinated=True)
        state.held[lease_id] = lease
        self.leases_granted += 1
        self._ensure_renewer(state)
        return lease

    async def start(self) -> None:
        """Join the cluster on this loop: renewals, heartbeats and limit reads start now."""
        state = self._state()
        self._ensure_renewer(state)
        if state.watcher is None or state.watcher.done():
            state.watcher = asyncio.get_running_loop().create_task(self._watch_limits(state))
        await self._heartbeat()

    # -- shared pause and learned limit (pools.engine.adaptive.SharedLimit) ----------------
    def publish(self, deployment: str, limit: float, pause_s: float, reason: str) -> None:
        """Tell the other instances of a 429 pause or of this instance's new limit.

        The cluster's limit is this instance's times the live instances: each instance runs
        its even share of one limit, so N instances send what one would, not N times it.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if not self.redis_available:
            return
        cluster_limit = limit * max(1, self.live_instances)
        until = time.monotonic() + pause_s
        known = self._limits.get(deployment)
        self._limits[deployment] = (cluster_limit, max(until, known[1] if known else 0), reason)
        state = self._state()
        task = loop.create_task(
            self._publish_limit(state, deployment, cluster_limit, pause_s, reason)
        )
        state.publishing.add(task)
        task.add_done_callback(state.publishing.discard)

    def current(self, deployment: str) -> tuple[float, float, str] | None:
        """This instance's share of the cluster's limit, the pause left, and the reason."""
        known = self._limits.get(deployment)
        if known is None:
            return None
        limit, until, reason = known
        return limit / max(1, self.live_instances), until - time.monotonic(), reason

    async def _publish_limit(
        self, state: _LoopState, deployment: str, limit: float, pause_s: float, reason: str
    ) -> None:
        try:
            async with state.client.pipeline(transaction=False) as pipe:
                pipe.hset(
                    self.limit_key(deployment),
                    mapping={"limit": f"{limit:.3f}", "reason": reason, "by": self.instance},
                )
                pipe.pexpire(self.limit_key(deployment), 600_000)
                await pipe.execute()
            if pause_s > 0:
                await state.pause_script(
                    keys=[self.pause_key(deployment)],
                    args=[max(1, int(pause_s * 1000)), f"{reason} (seen by {self.instance})"],
                )
        except (RedisError, OSError, TimeoutError) as exc:
            self._redis_failed(exc)

    async def _watch_limits(self, state: _LoopState) -> None:
        """Read every deployment's limit and pause, and how many instances share them."""
        while True:
            await asyncio.sleep(LIMIT_POLL_SECONDS)
            if not self.redis_available or not self.deployments:
                continue
            try:
                async with state.client.pipeline(transaction=False) as pipe:
                    for deployment in self.deployments:
                        pipe.hgetall(self.limit_key(deployment))
                        pipe.pttl(self.pause_key(deployment))
                        pipe.get(self.pause_key(deployment))
                    pipe.smembers(self._instances_key)
                    replies = await pipe.execute()
                instances = sorted(replies[-1])
                alive = (
                    await state.client.mget([self._instance_key(i) for i in instances])
                    if instances
                    else []
                )
            except (RedisError, OSError, TimeoutError) as exc:
                self._redis_failed(exc)
                continue
            self.live_instances = max(1, sum(1 for value in alive if value))
            now = time.monotonic()
            for index, deployment in enumerate(self.deployments):
                limit_hash, pause_ms, pause_reason = replies[3 * index : 3 * index + 3]
                known = self._limits.get(deployment)
                if not limit_hash and pause_ms <= 0:
                    continue
                limit = float(limit_hash.get("limit", 0)) if limit_hash else 0.0
                until = now + pause_ms / 1000 if pause_ms > 0 else (known[1] if known else 0)
                reason = pause_reason or (limit_hash or {}).get("reason", "")
                self._limits[deployment] = (limit or (known[0] if known else 0), until, reason)

    def _ensure_renewer(self, state: _LoopState) -> None:
        if state.renewer is None or state.renewer.done():
            state.renewer = asyncio.get_running_loop().create_task(self._renew_forever(state))

    async def acquire_waiting(
        self, pool: str, capacity: int, deployment: str, deadline: float
    ) -> Lease:
        """Try again while the cluster is full, until `deadline` (loop time)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                return await self.acquire(pool, capacity, deployment)
            except ClusterFull:
                pause = self.settings.poll_interval * (0.5 + random.random())
                if loop.time() + pause >= deadline:
                    raise
                await asyncio.sleep(pause)

    async def release(self, lease: Lease) -> None:
        """One round trip; if Redis is gone the lease simply expires."""
        if not lease.coordinated:
            return
        state = self._loops.get(asyncio.get_running_loop())
        if state is None:
            return
        state.held.pop(lease.lease_id, None)
        try:
            await state.client.zrem(lease.key, lease.lease_id)
        except (RedisError, OSError, TimeoutError) as exc:
            self._redis_failed(exc)

    async def _renew_forever(self, state: _LoopState) -> None:
        """Extend this loop's leases every third of the lease time; publish our heartbeat."""
        period = self.settings.lease_seconds / 3
        ttl_ms = int(self.settings.lease_seconds * 1000)
        while True:
            await asyncio.sleep(period)
            held = list(state.held.values())
            try:
                if held:
                    await state.renew_script(
                        keys=[lease.key for lease in held],
                        args=[ttl_ms, *[lease.lease_id for lease in held]],
                    )
            except (RedisError, OSError, TimeoutError) as exc:
                self._redis_failed(exc)
            await self._heartbeat()

    async def _heartbeat(self) -> None:
        if self.stats_provider is not None:
            await self.publish_stats(self.stats_provider())

    # -- shared breaker ------------------------------------------------------------------------
    async def publish_open(self, deployment: str, seconds: float, reason: str) -> None:
        """Tell every process that `deployment` is failing, for `seconds`."""
        if not self.redis_available:
            return
        try:
            await self._state().client.set(
                self.breaker_key(deployment),
                f"{reason} (seen by {self.instance})",
                px=max(1, int(seconds * 1000)),
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self._redis_failed(exc)

    async def publish_closed(self, deployment: str) -> None:
        if not self.redis_available:
            return
        try:
            await self._state().client.delete(self.breaker_key(deployment))
        except (RedisError, OSError, TimeoutError) as exc:
            self._redis_failed(exc)

    # -- shared rate budgets ------------------------------------------------------------------
    async def update(
        self,
        deployment: str,
        rpm: int,
        tpm: int,
        operation: BucketOperation,
        requests: float = 0,
        tokens: float = 0,
    ) -> BucketLevels | None:
        """`budget.SharedBuckets` on Redis: one round trip, None while Redis is away."""
        if not self.redis_available:
            return None
        try:
            wait_ms, left_requests, left_tokens = await self._state().budget_script(
                keys=[self.budget_key(deployment)],
                args=[rpm, tpm, operation, requests, tokens],
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self._redis_failed(exc)
            return None
        self._redis_succeeded()
        return BucketLevels(float(wait_ms) / 1000, float(left_requests), float(left_tokens))

    # -- the cluster's view ---------------------------------------------------------------------
    async def publish_stats(self, stats: dict[str, Any]) -> None:
        """Register this instance with its live stats, expiring if it stops publishing."""
        if not self.redis_available:
            return
        client = self._state().client
        ttl_ms = int(self.settings.lease_seconds * 3000)
        try:
            async with client.pipeline(transaction=False) as pipe:
                pipe.set(self._instance_key(self.instance), json.dumps(stats), px=ttl_ms)
                pipe.sadd(self._instances_key, self.instance)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self._redis_failed(exc)

    async def cluster_stats(self) -> dict[str, Any]:
        """Every live instance's last published stats, and the leases held per pool."""
        client = self._state().client
        members = await client.smembers(self._instances_key)  # text: decode_responses
        instances = sorted(m if isinstance(m, str) else m.decode() for m in members)
        values = await client.mget([self._instance_key(i) for i in instances]) if instances else []
        live = {i: json.loads(v) for i, v in zip(instances, values, strict=True) if v}
        gone = [i for i in instances if i not in live]
        if gone:
            await client.srem(self._instances_key, *gone)
        pools: set[str] = set()
        for stats in live.values():
            pools.update(stats.get("pools", {}))
        now_ms = int(time.time() * 1000)
        leases = {}
        for pool in sorted(pools):
            leases[pool] = await client.zcount(self.lease_key(pool), now_ms, "+inf")
        return {"instances": live, "leases_held": leases}

    def snapshot(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "mode": "cluster" if self.redis_available else "local (Redis unreachable)",
            "lease_seconds": self.settings.lease_seconds,
            "leases_granted": self.leases_granted,
            "local_fallbacks": self.local_fallbacks,
            "redis_errors": self.redis_errors,
            "last_error": self.last_error,
        }

    async def aclose_loop(self) -> None:
        """Stop this loop's renewals, drop its leases from Redis, close its client."""
        state = self._loops.pop(asyncio.get_running_loop(), None)
        if state is None:
            return
        for task in (state.renewer, state.watcher, *state.publishing):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        try:
            for lease in list(state.held.values()):
                await state.client.zrem(lease.key, lease.lease_id)
            await state.client.srem(self._instances_key, self.instance)
            await state.client.delete(self._instance_key(self.instance))
        except (RedisError, OSError, TimeoutError):
            pass  # they expire on their own
        await state.client.aclose()
