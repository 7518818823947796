"""The outside services some tests need, probed once: Redis and PostgreSQL.

A test that needs one is skipped, with the reason, when it is not running (`.ci/run` starts
both). What a test run writes there is its own: a Redis key prefix and a database name made
per run (`run_prefix`, `throwaway_database`), deleted afterwards, so runs sharing the
machine's services never meet and never touch a deployment's `carlos:` keys.
"""

from __future__ import annotations

import contextlib
import functools
import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import redis
from psycopg import sql

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432")
# Redis databases of the tests' own: 15 for the engine's cluster tests, 14 for whole servers.
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
CLUSTER_REDIS_URL = os.environ.get("TEST_CLUSTER_REDIS_URL", "redis://127.0.0.1:6379/14")


@functools.cache
def redis_problem(url: str = REDIS_URL) -> str | None:
    """Why Redis at `url` cannot be used, or None when it answers."""
    try:
        redis.Redis.from_url(url, socket_timeout=1).ping()
    except redis.RedisError as exc:
        return f"no Redis at {url} ({exc}); .ci/run starts one"
    return None


@functools.cache
def postgres_problem() -> str | None:
    """Why the PostgreSQL server at POSTGRES_URL cannot be used, or None when it answers."""
    try:
        psycopg.connect(f"{POSTGRES_URL}/postgres", connect_timeout=2).close()
    except psycopg.Error as exc:
        return f"no PostgreSQL at {POSTGRES_URL} ({exc}); .ci/run starts one"
    return None


def needs_redis(url: str = REDIS_URL) -> pytest.MarkDecorator:
    problem = redis_problem(url)
    return pytest.mark.skipif(problem is not None, reason=problem or "")


def needs_postgres() -> pytest.MarkDecorator:
    problem = postgres_problem()
    return pytest.mark.skipif(problem is not None, reason=problem or "")


def run_prefix(label: str = "test") -> str:
    """A Redis key prefix (REDIS_PREFIX, CLUSTER PREFIX) no other run or deployment uses."""
    return f"{label}-{uuid.uuid4().hex[:8]}"


def forget_keys(url: str, prefix: str) -> None:
    """Delete every key under `prefix` (this run's own) in the Redis at `url`."""
    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
    finally:
        client.close()


@contextlib.contextmanager
def throwaway_database(label: str = "carlos_test") -> Iterator[str]:
    """A new, empty PostgreSQL database of this run's own (its URL); dropped afterwards."""
    name = f"{label}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{POSTGRES_URL}/postgres", autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"{POSTGRES_URL}/{name}"
    finally:
        with psycopg.connect(f"{POSTGRES_URL}/postgres", autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
