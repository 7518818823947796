"""Typed pool configuration, parsed from one plain dictionary.

Each dataclass below is the one place its defaults, bounds and environment variables are
written; `typed_settings.build` reads the dictionary into it. The parser collects every problem
instead of stopping at the first, so the Django system check can show them all at once, each
naming the setting the user wrote.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import urlsplit

from pools.engine.exceptions import ConfigError
from pools.engine.typed_settings import ConfigErrors, build, internal, is_blank, setting

__all__ = [
    "ClusterConfig",
    "ConfigErrors",
    "EndpointConfig",
    "EndpointSettings",
    "HttpLimits",
    "PoolConfig",
    "PoolsConfig",
    "RateLimit",
    "Resilience",
    "parse_config",
    "sized_for",
]

EndpointKind = Literal["azure", "openai", "simulator"]

# The design note's pools: what each is for decides its model and temperature.
DEFAULT_POOLS: dict[str, dict[str, Any]] = {
    "main": {"MODEL": "gpt-4o"},
    "ronei": {"MODEL": "gpt-4o", "TEMPERATURE": 0.9},
    "mini": {"MODEL": "gpt-4o-mini"},
}
# The note's pools: main and mini take the global size, ronei (used less often) half of it.
SIZE_SHARE = {"ronei": 0.5}


@dataclass(frozen=True)
class EndpointSettings:
    """CARLOS_POOLS['ENDPOINT'] as written: `parse_config` picks the one upstream from it."""

    azure_endpoint: str = setting("", env="AZURE_OPENAI_ENDPOINT")
    azure_api_key: str = setting("", env="AZURE_OPENAI_API_KEY", shown=False)
    azure_api_version: str = setting("2024-10-21", env="AZURE_OPENAI_API_VERSION")
    base_url: str = setting("", env="LLM_BASE_URL")
    api_key: str = setting("", env="LLM_API_KEY", shown=False)
    simulator_url: str = setting("", env="LLM_SIMULATOR_URL")
    ca_bundle: str = setting("", env="LLM_CA_BUNDLE")


@dataclass(frozen=True)
class EndpointConfig:
    """Where every pool sends its calls, and how it authenticates (never shown anywhere)."""

    kind: EndpointKind
    base_url: str
    api_key: str = field(repr=False, default="")
    api_version: str = ""
    ca_bundle: str = ""

    @property
    def public_url(self) -> str:
        """The URL without credentials, path secrets or query: safe for logs and /health."""
        parts = urlsplit(self.base_url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}"


@dataclass(frozen=True)
class HttpLimits:
    """The shared keep-alive HTTP client's limits (the design note's 100 / 20)."""

    max_connections: int = setting(100, low=1)
    max_keepalive_connections: int = setting(20, low=1)
    keepalive_expiry: float = setting(120.0, above=0, unit="seconds")
    connect_timeout: float = setting(5.0, above=0, unit="seconds")
    read_timeout: float = setting(60.0, above=0, unit="seconds")


@dataclass(frozen=True)
class PoolConfig:
    """One named pool: the model it talks to and how many slots it keeps."""

    name: str = internal()
    model: str = setting(env="")  # the deployment name: AZURE_OPENAI_[MINI_]DEPLOYMENT_NAME
    # Without SIZE the global size knob decides it (`sized_for`).
    size: int = setting(low=1)
    temperature: float = setting(0.7, low=0, high=2, env="")
    # None: the note's behaviour, a temporary connection instead of blocking, bounded only by
    # the HTTP connection limit. A number: at most that many temporary connections, then
    # callers queue FIFO.
    max_overflow: int | None = setting(None, low=0)
    timeout: float = setting(30.0, above=0, unit="seconds")
    max_waiting: int | None = setting(None, low=0)
    # Deadlines: response headers or first token, the gap between chunks, the whole call. The
    # SDK's 600 s defaults are never in force.
    first_token_timeout: float = setting(30.0, above=0, unit="seconds")
    idle_timeout: float = setting(30.0, above=0, unit="seconds")
    call_timeout: float = setting(180.0, above=0, unit="seconds")
    max_retries: int = setting(2, low=0)
    # True when SIZE was set for this pool, so the global size knob leaves it alone.
    size_explicit: bool = internal(False)
    # Calls in flight to the deployment follow a limit learned from the endpoint (429s,
    # x-ratelimit-remaining-*, time to first token), between these bounds; None for the
    # ceiling means size plus overflow. False keeps a fixed limit (the pause still applies).
    adaptive: bool = setting(True)
    min_concurrency: int = setting(1, low=1)
    max_concurrency: int | None = setting(None, low=1)


@dataclass(frozen=True)
class Resilience:
    """Backoff between retries and the circuit breaker shared by pools of one deployment."""

    backoff_base: float = setting(0.5, above=0)
    backoff_max: float = setting(8.0, above=0)
    retry_after_cap: float = setting(30.0, above=0)
    # A run of 10, not 5: with ~100 calls in flight per deployment, a few injected resets
    # completing together made 5 in a row while 95 % of calls succeeded (the load test).
    breaker_failures: int = setting(10, low=1)
    breaker_failure_rate: float = setting(0.5, above=0, high=1)
    breaker_window: int = setting(20, low=1)
    breaker_cooldown: float = setting(30.0, above=0)
    # Rate budgets: how long a call may wait for its budget, and the output-token guess
    # for calls that set no max_tokens.
    rate_limit_max_wait: float = setting(10.0, above=0)
    default_output_tokens: int = setting(1000, low=1)
    # The learned concurrency limit: multiplied by this on a 429, and cut by the latency
    # gradient when time to first token exceeds its best recent value times the tolerance.
    limit_backoff_ratio: float = setting(0.7, above=0, below=1)
    limit_latency_tolerance: float = setting(2.0, above=1)


@dataclass(frozen=True)
class ClusterConfig:
    """Redis coordination across processes; absent means each process limits itself."""

    url: str = setting(key="REDIS_URL", env="REDIS_URL", shown=False)
    prefix: str = setting("carlos", env="REDIS_PREFIX")
    lease_seconds: float = setting(10.0, above=0, env="POOL_LEASE_SECONDS")
    # Past this, Redis counts as unreachable.
    redis_timeout: float = setting(0.25, above=0, env="REDIS_TIMEOUT")
    # How long to stay on local limits before trying Redis again.
    retry_redis_after: float = setting(5.0, above=0)
    # While the cluster is full, how often to try again.
    poll_interval: float = setting(0.02, above=0)


@dataclass(frozen=True)
class RateLimit:
    """Requests and tokens per minute for one deployment; 0 means no limit."""

    rpm: int = setting(0, low=0, env="LLM_RATE_LIMITS")
    tpm: int = setting(0, low=0, env="LLM_RATE_LIMITS")


@dataclass(frozen=True)
class PoolsConfig:
    endpoint: EndpointConfig
    pools: dict[str, PoolConfig]
    http: HttpLimits = setting(factory=HttpLimits, env="HTTP_")
    # The design note's single size knob: main and mini get it, ronei half of it.
    size: int = setting(10, low=1, env="POOL_SIZE")
    resilience: Resilience = setting(factory=Resilience)
    rate_limits: dict[str, RateLimit] = field(default_factory=dict)
    cluster: ClusterConfig | None = None

    @property
    def total_slots(self) -> int:
        return sum(pool.size for pool in self.pools.values())

    def with_size(self, size: int) -> PoolsConfig:
        """The same configuration with the note's global size knob set to `size`."""
        if size < 1:
            raise ConfigError("size", f"must be at least 1, got {size}")
        pools = {
            name: pool if pool.size_explicit else replace(pool, size=sized_for(name, size))
            for name, pool in self.pools.items()
        }
        return replace(self, pools=pools, size=size)


def sized_for(pool_name: str, global_size: int) -> int:
    return max(1, math.floor(global_size * SIZE_SHARE.get(pool_name, 1.0)))


def _is_http_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        return False
    return parts.scheme in {"http", "https"} and bool(parts.hostname) and port_ok


def _redact(url: str) -> str:
    """A URL safe to show in an error: no user, password or query string."""
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
    except ValueError:
        return "<unparseable URL>"
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else host or url[:40]


def parse_config(raw: dict[str, Any], prefix: str = "CARLOS_POOLS") -> PoolsConfig:
    """Build a `PoolsConfig` or raise `ConfigErrors` listing every problem found."""
    if not isinstance(raw, dict):
        raise ConfigErrors([ConfigError(prefix, "must be a dictionary")])
    errors: list[ConfigError] = []
    endpoint_settings = build(
        EndpointSettings, raw.get("ENDPOINT"), f"{prefix}['ENDPOINT']", errors
    )
    given = {
        "endpoint": _endpoint(endpoint_settings or EndpointSettings(), errors),
        "pools": _parse_pools(raw.get("POOLS", DEFAULT_POOLS), f"{prefix}['POOLS']", errors),
        "rate_limits": _parse_rate_limits(
            raw.get("RATE_LIMITS"), f"{prefix}['RATE_LIMITS']", errors
        ),
        "cluster": _parse_cluster(raw.get("CLUSTER"), f"{prefix}['CLUSTER']", errors),
    }
    config = build(PoolsConfig, raw, prefix, errors, given=given)
    if errors or config is None:
        raise ConfigErrors(errors or [ConfigError(prefix, "is incomplete")])
    return config.with_size(config.size)


def _endpoint(written: EndpointSettings, errors: list[ConfigError]) -> EndpointConfig:
    """Azure OpenAI when its endpoint is set; else an OpenAI-compatible server; else the
    offline simulator."""
    if written.azure_endpoint:
        if not _is_http_url(written.azure_endpoint):
            errors.append(
                ConfigError(
                    "AZURE_OPENAI_ENDPOINT",
                    f"is not a valid http(s) URL: {_redact(written.azure_endpoint)!r}",
                )
            )
        if not written.azure_api_key:
            errors.append(
                ConfigError("AZURE_OPENAI_API_KEY", "is required when AZURE_OPENAI_ENDPOINT is set")
            )
        return EndpointConfig(
            "azure",
            written.azure_endpoint.rstrip("/"),
            written.azure_api_key,
            written.azure_api_version,
            written.ca_bundle,
        )
    if written.base_url:
        if not _is_http_url(written.base_url):
            errors.append(
                ConfigError(
                    "LLM_BASE_URL", f"is not a valid http(s) URL: {_redact(written.base_url)!r}"
                )
            )
        if not written.api_key:
            errors.append(
                ConfigError(
                    "LLM_API_KEY",
                    "is required when LLM_BASE_URL is set (any value for keyless servers)",
                )
            )
        base = written.base_url.rstrip("/")
        return EndpointConfig("openai", base, written.api_key, "", written.ca_bundle)
    simulator = written.simulator_url
    if not simulator or not _is_http_url(simulator):
        errors.append(
            ConfigError(
                "LLM_SIMULATOR_URL",
                f"no endpoint is configured (set AZURE_OPENAI_ENDPOINT or LLM_BASE_URL) and the "
                f"simulator URL is not a valid http(s) URL: {_redact(simulator)!r}",
            )
        )
    return EndpointConfig("simulator", simulator.rstrip("/"), "simulator", "", written.ca_bundle)


def _parse_pools(raw: object, where: str, errors: list[ConfigError]) -> dict[str, PoolConfig]:
    if not isinstance(raw, dict) or not raw:
        errors.append(ConfigError(where, "must be a non-empty dictionary of pool name to options"))
        return {}
    return _each(raw, where, lambda name, options, place: _parse_pool(name, options, place, errors))


def _each[T](
    raw: dict[Any, Any], where: str, parse: Callable[[Any, Any, str], T | None]
) -> dict[Any, T]:
    """`parse(name, options, where)` for each entry of `raw`: the ones it could build."""
    built = {name: parse(name, options, f"{where}['{name}']") for name, options in raw.items()}
    return {name: value for name, value in built.items() if value is not None}


def _parse_pool(
    name: object, options: object, where: str, errors: list[ConfigError]
) -> PoolConfig | None:
    if not isinstance(name, str) or not name.isidentifier():
        errors.append(ConfigError(where, "a pool name must be a plain identifier such as 'main'"))
        return None
    if not isinstance(options, dict):
        errors.append(ConfigError(where, "must be a dictionary of pool options"))
        return None
    written = {key: value for key, value in options.items() if not is_blank(value)}
    explicit = "SIZE" in written
    # Without SIZE, `with_size` gives the pool its share of the global size.
    given: dict[str, Any] = {
        "name": name,
        "size_explicit": explicit,
        **({} if explicit else {"size": 1}),
    }
    env_prefix = f"POOL_{name.upper()}_"
    pool = build(
        PoolConfig,
        {**DEFAULT_POOLS.get(name, {}), **written},
        where,
        errors,
        env_prefix=env_prefix,
        given=given,
    )
    if pool and pool.max_concurrency is not None and pool.max_concurrency < pool.min_concurrency:
        errors.append(
            ConfigError(
                f"{where}['MAX_CONCURRENCY'] ({env_prefix}MAX_CONCURRENCY)",
                f"must be at least MIN_CONCURRENCY ({pool.min_concurrency})",
            )
        )
    return pool


def _parse_rate_limits(raw: object, where: str, errors: list[ConfigError]) -> dict[str, RateLimit]:
    """From a dict {deployment: {"RPM": n, "TPM": n}} or the env form "gpt-4o=600/150000,..."."""
    variable = "LLM_RATE_LIMITS"
    if is_blank(raw):
        return {}
    if isinstance(raw, str):
        parsed: dict[str, dict[str, str]] = {}
        for item in filter(None, (part.strip() for part in raw.split(","))):
            name, _, figures = item.partition("=")
            rpm, _, tpm = figures.partition("/")
            if not name.strip() or not rpm.strip():
                errors.append(ConfigError(variable, f"expected deployment=RPM[/TPM], got {item!r}"))
                continue
            parsed[name.strip()] = {"RPM": rpm, "TPM": tpm}
        raw = parsed
    if not isinstance(raw, dict):
        errors.append(ConfigError(variable, "must be a dictionary or 'deployment=RPM/TPM,...'"))
        return {}
    return _each(raw, where, lambda _name, options, place: build(RateLimit, options, place, errors))


def _parse_cluster(raw: object, where: str, errors: list[ConfigError]) -> ClusterConfig | None:
    """None without a Redis URL: each process limits itself."""
    url = raw.get("REDIS_URL") if isinstance(raw, dict) else None
    given = {"url": ""} if is_blank(url) else {}
    cluster = build(ClusterConfig, raw, where, errors, given=given)
    if cluster is None or not cluster.url:
        return None
    try:
        scheme = urlsplit(cluster.url).scheme
    except ValueError:
        scheme = ""
    if scheme not in {"redis", "rediss", "unix"}:
        errors.append(
            ConfigError(
                "REDIS_URL",
                f"must be a redis://, rediss:// or unix:// URL, got {_redact(cluster.url)!r}",
            )
        )
    return cluster
