"""Typed pool configuration, parsed from one plain dictionary.

The parser collects every problem instead of stopping at the first, so the Django system
check can show them all at once, each naming the setting the user wrote.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import urlsplit

from pools.engine.exceptions import ConfigError

EndpointKind = Literal["azure", "openai", "simulator"]

DEFAULT_POOLS: dict[str, dict[str, Any]] = {
    "main": {"MODEL": "gpt-4o", "TEMPERATURE": 0.7},
    "ronei": {"MODEL": "gpt-4o", "TEMPERATURE": 0.9},
    "mini": {"MODEL": "gpt-4o-mini", "TEMPERATURE": 0.7},
}
DEFAULT_SIZE = 10
# The note's pools: main and mini take the global size, ronei (used less often) half of it.
SIZE_SHARE = {"ronei": 0.5}

_TOP_KEYS = {"ENDPOINT", "SIZE", "HTTP", "POOLS", "RESILIENCE", "RATE_LIMITS", "CLUSTER"}
_ENDPOINT_KEYS = {
    "AZURE_ENDPOINT",
    "AZURE_API_KEY",
    "AZURE_API_VERSION",
    "BASE_URL",
    "API_KEY",
    "SIMULATOR_URL",
    "CA_BUNDLE",
}
_HTTP_KEYS = {
    "MAX_CONNECTIONS",
    "MAX_KEEPALIVE_CONNECTIONS",
    "KEEPALIVE_EXPIRY",
    "CONNECT_TIMEOUT",
    "READ_TIMEOUT",
}
_POOL_KEYS = {
    "MODEL",
    "TEMPERATURE",
    "SIZE",
    "MAX_OVERFLOW",
    "TIMEOUT",
    "MAX_WAITING",
    "FIRST_TOKEN_TIMEOUT",
    "IDLE_TIMEOUT",
    "CALL_TIMEOUT",
    "MAX_RETRIES",
    "ADAPTIVE",
    "MIN_CONCURRENCY",
    "MAX_CONCURRENCY",
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
# Per-pool deadlines (seconds) and retries; the SDK's 600 s defaults are never in force.
_POOL_DEADLINES = {"FIRST_TOKEN_TIMEOUT": 30.0, "IDLE_TIMEOUT": 30.0, "CALL_TIMEOUT": 180.0}


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

    max_connections: int = 100
    max_keepalive_connections: int = 20
    keepalive_expiry: float = 120.0
    connect_timeout: float = 5.0
    read_timeout: float = 60.0


@dataclass(frozen=True)
class PoolConfig:
    """One named pool: the model it talks to and how many slots it keeps."""

    name: str
    model: str
    temperature: float
    size: int
    # None: the note's behaviour, a temporary connection instead of blocking, bounded only by
    # the HTTP connection limit. A number: at most that many temporary connections, then
    # callers queue FIFO.
    max_overflow: int | None = None
    timeout: float = 30.0
    max_waiting: int | None = None
    # Deadlines: response headers or first token, the gap between chunks, the whole call.
    first_token_timeout: float = 30.0
    idle_timeout: float = 30.0
    call_timeout: float = 180.0
    max_retries: int = 2
    # True when SIZE was set for this pool, so the global size knob leaves it alone.
    size_explicit: bool = False
    # Calls in flight to the deployment follow a limit learned from the endpoint (429s,
    # x-ratelimit-remaining-*, time to first token), between these bounds; None for the
    # ceiling means size plus overflow. False keeps a fixed limit (the pause still applies).
    adaptive: bool = True
    min_concurrency: int = 1
    max_concurrency: int | None = None


@dataclass(frozen=True)
class Resilience:
    """Backoff between retries and the circuit breaker shared by pools of one deployment."""

    backoff_base: float = 0.5
    backoff_max: float = 8.0
    retry_after_cap: float = 30.0
    # A run of 10, not 5: with ~100 calls in flight per deployment, a few injected resets
    # completing together made 5 in a row while 95 % of calls succeeded (the load test).
    breaker_failures: int = 10
    breaker_failure_rate: float = 0.5
    breaker_window: int = 20
    breaker_cooldown: float = 30.0
    # Rate budgets: how long a call may wait for its budget, and the output-token guess
    # for calls that set no max_tokens.
    rate_limit_max_wait: float = 10.0
    default_output_tokens: int = 1000
    # The learned concurrency limit: multiplied by this on a 429, and cut by the latency
    # gradient when time to first token exceeds its best recent value times the tolerance.
    limit_backoff_ratio: float = 0.7
    limit_latency_tolerance: float = 2.0


@dataclass(frozen=True)
class ClusterConfig:
    """Redis coordination across processes; absent means each process limits itself."""

    url: str = field(repr=False)
    prefix: str = "carlos"
    lease_seconds: float = 10.0
    redis_timeout: float = 0.25  # past this, Redis counts as unreachable
    retry_redis_after: float = 5.0  # how long to stay on local limits before trying again
    poll_interval: float = 0.02  # while the cluster is full, how often to try again


@dataclass(frozen=True)
class RateLimit:
    """Requests and tokens per minute for one deployment; 0 means no limit."""

    rpm: int = 0
    tpm: int = 0


@dataclass(frozen=True)
class PoolsConfig:
    endpoint: EndpointConfig
    http: HttpLimits
    pools: dict[str, PoolConfig]
    resilience: Resilience = field(default_factory=Resilience)
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
        return replace(self, pools=pools)


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
    errors: list[ConfigError] = []

    def err(setting: str, message: str) -> None:
        errors.append(ConfigError(setting, message))

    if not isinstance(raw, dict):
        raise ConfigErrors([ConfigError(prefix, "must be a dictionary")])
    for key in sorted(set(raw) - _TOP_KEYS):
        err(f"{prefix}['{key}']", f"unknown key; expected one of {sorted(_TOP_KEYS)}")

    endpoint = _parse_endpoint(raw.get("ENDPOINT") or {}, f"{prefix}['ENDPOINT']", err)
    http = _parse_http(raw.get("HTTP") or {}, f"{prefix}['HTTP']", err)

    global_size = _number(raw.get("SIZE", DEFAULT_SIZE), int)
    if global_size is None:
        global_size = DEFAULT_SIZE
    if not _is_int(global_size) or global_size < 1:
        err(
            f"{prefix}['SIZE'] (POOL_SIZE)",
            f"must be a whole number of at least 1, got {global_size!r}",
        )
        global_size = DEFAULT_SIZE

    raw_pools = raw.get("POOLS", DEFAULT_POOLS)
    pools: dict[str, PoolConfig] = {}
    if not isinstance(raw_pools, dict) or not raw_pools:
        err(f"{prefix}['POOLS']", "must be a non-empty dictionary of pool name to options")
        raw_pools = {}
    for name, options in raw_pools.items():
        pool = _parse_pool(name, options, global_size, f"{prefix}['POOLS']['{name}']", err)
        if pool is not None:
            pools[name] = pool

    resilience = _parse_resilience(raw.get("RESILIENCE") or {}, f"{prefix}['RESILIENCE']", err)
    rate_limits = _parse_rate_limits(raw.get("RATE_LIMITS") or {}, err)
    cluster = _parse_cluster(raw.get("CLUSTER") or {}, err)
    if errors:
        raise ConfigErrors(errors)
    return PoolsConfig(
        endpoint=endpoint,
        http=http,
        pools=pools,
        resilience=resilience,
        rate_limits=rate_limits,
        cluster=cluster,
    )


class ConfigErrors(ConfigError):
    """Several configuration problems at once."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        first = errors[0]
        super().__init__(first.setting, "; ".join(str(e) for e in errors))


def _number(value: Any, kind: type[int] | type[float]) -> Any:
    """Numbers from the environment arrive as text: convert, or leave for the validator."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_endpoint(raw: dict[str, Any], where: str, err) -> EndpointConfig:
    for key in sorted(set(raw) - _ENDPOINT_KEYS):
        err(f"{where}['{key}']", f"unknown key; expected one of {sorted(_ENDPOINT_KEYS)}")
    azure = (raw.get("AZURE_ENDPOINT") or "").strip()
    base = (raw.get("BASE_URL") or "").strip()
    simulator = (raw.get("SIMULATOR_URL") or "").strip()
    ca_bundle = (raw.get("CA_BUNDLE") or "").strip()
    if azure:
        if not _is_http_url(azure):
            err("AZURE_OPENAI_ENDPOINT", f"is not a valid http(s) URL: {_redact(azure)!r}")
        key = raw.get("AZURE_API_KEY") or ""
        if not key:
            err("AZURE_OPENAI_API_KEY", "is required when AZURE_OPENAI_ENDPOINT is set")
        version = raw.get("AZURE_API_VERSION") or ""
        if not version:
            err("AZURE_OPENAI_API_VERSION", "is required for Azure OpenAI")
        return EndpointConfig("azure", azure.rstrip("/"), key, version, ca_bundle)
    if base:
        if not _is_http_url(base):
            err("LLM_BASE_URL", f"is not a valid http(s) URL: {_redact(base)!r}")
        key = raw.get("API_KEY") or ""
        if not key:
            err(
                "LLM_API_KEY",
                "is required when LLM_BASE_URL is set (any value for keyless servers)",
            )
        return EndpointConfig("openai", base.rstrip("/"), key, "", ca_bundle)
    if not simulator or not _is_http_url(simulator):
        err(
            "LLM_SIMULATOR_URL",
            f"no endpoint is configured (set AZURE_OPENAI_ENDPOINT or LLM_BASE_URL) and the "
            f"simulator URL is not a valid http(s) URL: {_redact(simulator)!r}",
        )
    return EndpointConfig("simulator", simulator.rstrip("/"), "simulator", "", ca_bundle)


def _parse_http(raw: dict[str, Any], where: str, err) -> HttpLimits:
    for key in sorted(set(raw) - _HTTP_KEYS):
        err(f"{where}['{key}']", f"unknown key; expected one of {sorted(_HTTP_KEYS)}")
    defaults = HttpLimits()
    values: dict[str, Any] = {}
    for key in ("MAX_CONNECTIONS", "MAX_KEEPALIVE_CONNECTIONS"):
        value = _number(raw.get(key, getattr(defaults, key.lower())), int)
        if not _is_int(value) or value < 1:
            err(
                f"{where}['{key}'] (HTTP_{key})",
                f"must be a whole number of at least 1, got {value!r}",
            )
            value = getattr(defaults, key.lower())
        values[key.lower()] = value
    for key in ("KEEPALIVE_EXPIRY", "CONNECT_TIMEOUT", "READ_TIMEOUT"):
        value = _number(raw.get(key, getattr(defaults, key.lower())), float)
        if not _is_number(value) or value <= 0:
            err(
                f"{where}['{key}'] (HTTP_{key})",
                f"must be a positive number of seconds, got {value!r}",
            )
            value = getattr(defaults, key.lower())
        values[key.lower()] = float(value)
    return HttpLimits(**values)


def _parse_cluster(raw: dict[str, Any], err) -> ClusterConfig | None:
    known = {"REDIS_URL", "PREFIX", "LEASE_SECONDS", "REDIS_TIMEOUT"}
    for key in sorted(set(raw) - known):
        err(f"CARLOS_POOLS['CLUSTER']['{key}']", f"unknown key; expected one of {sorted(known)}")
    url = (raw.get("REDIS_URL") or "").strip()
    if not url:
        return None
    try:
        scheme = urlsplit(url).scheme
    except ValueError:
        scheme = ""
    if scheme not in {"redis", "rediss", "unix"}:
        err("REDIS_URL", f"must be a redis://, rediss:// or unix:// URL, got {_redact(url)!r}")
    values: dict[str, Any] = {"url": url, "prefix": str(raw.get("PREFIX") or "carlos")}
    for key, default in (("LEASE_SECONDS", 10.0), ("REDIS_TIMEOUT", 0.25)):
        value = _number(raw.get(key, default), float)
        if value is None:
            value = default
        if not _is_number(value) or value <= 0:
            err(f"CARLOS_POOLS['CLUSTER']['{key}']", f"must be a positive number, got {value!r}")
            value = default
        values[key.lower()] = float(value)
    return ClusterConfig(**values)


def _parse_rate_limits(raw: Any, err) -> dict[str, RateLimit]:
    """From a dict {deployment: {"RPM": n, "TPM": n}} or the env form "gpt-4o=600/150000,..."."""
    where = "LLM_RATE_LIMITS"
    if isinstance(raw, str):
        parsed: dict[str, dict[str, Any]] = {}
        for item in filter(None, (part.strip() for part in raw.split(","))):
            name, _, limits = item.partition("=")
            rpm, _, tpm = limits.partition("/")
            if not name.strip() or not rpm.strip():
                err(where, f"expected deployment=RPM[/TPM], got {item!r}")
                continue
            parsed[name.strip()] = {"RPM": rpm, "TPM": tpm or "0"}
        raw = parsed
    if not isinstance(raw, dict):
        err(where, "must be a dictionary or 'deployment=RPM/TPM,...'")
        return {}
    limits: dict[str, RateLimit] = {}
    for name, options in raw.items():
        values = {}
        for key in ("RPM", "TPM"):
            value = _number((options or {}).get(key, 0), int)
            if value is None:
                value = 0
            if not _is_int(value) or value < 0:
                err(f"{where} ({name} {key})", f"must be a whole number >= 0, got {value!r}")
                value = 0
            values[key.lower()] = value
        limits[name] = RateLimit(**values)
    return limits


def _parse_resilience(raw: dict[str, Any], where: str, err) -> Resilience:
    defaults = Resilience()
    known = {name.upper() for name in defaults.__dataclass_fields__}
    for key in sorted(set(raw) - known):
        err(f"{where}['{key}']", f"unknown key; expected one of {sorted(known)}")
    values: dict[str, Any] = {}
    for name in defaults.__dataclass_fields__:
        default = getattr(defaults, name)
        kind = int if isinstance(default, int) else float
        value = _number(raw.get(name.upper(), default), kind)
        if name == "breaker_failure_rate":
            valid = _is_number(value) and 0 < value <= 1
        elif name == "limit_backoff_ratio":
            valid = _is_number(value) and 0 < value < 1
        elif name == "limit_latency_tolerance":
            valid = _is_number(value) and value > 1
        elif kind is int:
            valid = _is_int(value) and value >= 1
        else:
            valid = _is_number(value) and value > 0
        if not valid:
            err(f"{where}['{name.upper()}']", f"invalid value {value!r}")
            value = default
        values[name] = kind(value)
    return Resilience(**values)


def _parse_pool(name: Any, options: Any, global_size: int, where: str, err) -> PoolConfig | None:
    if not isinstance(name, str) or not name.isidentifier():
        err(where, "a pool name must be a plain identifier such as 'main'")
        return None
    if not isinstance(options, dict):
        err(where, "must be a dictionary of pool options")
        return None
    for key in sorted(set(options) - _POOL_KEYS):
        err(f"{where}['{key}']", f"unknown key; expected one of {sorted(_POOL_KEYS)}")
    defaults = DEFAULT_POOLS.get(name, {})
    model = options.get("MODEL") or defaults.get("MODEL")
    if not isinstance(model, str) or not model.strip():
        err(f"{where}['MODEL']", "a model or deployment name is required")
        model = ""
    temperature = _number(options.get("TEMPERATURE", defaults.get("TEMPERATURE", 0.7)), float)
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        err(f"{where}['TEMPERATURE']", f"must be a number from 0 to 2, got {temperature!r}")
        temperature = 0.7
    size = _number(options.get("SIZE"), int)
    size_explicit = size is not None
    if size is None:
        size = sized_for(name, global_size)
    elif not _is_int(size) or size < 1:
        err(
            f"{where}['SIZE'] (POOL_{name.upper()}_SIZE)",
            f"must be a whole number of at least 1, got {size!r}",
        )
        size = 1
    max_overflow = _number(options.get("MAX_OVERFLOW"), int)
    if max_overflow is not None and (not _is_int(max_overflow) or max_overflow < 0):
        err(
            f"{where}['MAX_OVERFLOW']",
            f"must be empty (no cap) or a whole number >= 0, got {max_overflow!r}",
        )
        max_overflow = None
    timeout = _number(options.get("TIMEOUT", 30.0), float)
    if not _is_number(timeout) or timeout <= 0:
        err(f"{where}['TIMEOUT']", f"must be a positive number of seconds, got {timeout!r}")
        timeout = 30.0
    max_waiting = _number(options.get("MAX_WAITING"), int)
    if max_waiting is not None and (not _is_int(max_waiting) or max_waiting < 0):
        err(
            f"{where}['MAX_WAITING']",
            f"must be empty (no limit) or a whole number >= 0, got {max_waiting!r}",
        )
        max_waiting = None
    deadlines: dict[str, float] = {}
    for key, default in _POOL_DEADLINES.items():
        value = _number(options.get(key, default), float)
        if not _is_number(value) or value <= 0:
            err(f"{where}['{key}']", f"must be a positive number of seconds, got {value!r}")
            value = default
        deadlines[key.lower()] = float(value)
    max_retries = _number(options.get("MAX_RETRIES", 2), int)
    if not _is_int(max_retries) or max_retries < 0:
        err(f"{where}['MAX_RETRIES']", f"must be a whole number >= 0, got {max_retries!r}")
        max_retries = 2
    adaptive = options.get("ADAPTIVE", True)
    if isinstance(adaptive, str) and adaptive.strip().lower() in _TRUE | _FALSE:
        adaptive = adaptive.strip().lower() in _TRUE
    elif adaptive is None or (isinstance(adaptive, str) and not adaptive.strip()):
        adaptive = True
    if not isinstance(adaptive, bool):
        err(
            f"{where}['ADAPTIVE'] (POOL_{name.upper()}_ADAPTIVE)",
            f"must be 1 or 0 (true or false), got {adaptive!r}",
        )
        adaptive = True
    bounds: dict[str, int | None] = {}
    for key, default in (("MIN_CONCURRENCY", 1), ("MAX_CONCURRENCY", None)):
        value = _number(options.get(key, default), int)
        if value is None:
            value = default
        if value is not None and (not _is_int(value) or value < 1):
            err(
                f"{where}['{key}'] (POOL_{name.upper()}_{key})",
                f"must be a whole number of at least 1, got {value!r}",
            )
            value = default
        bounds[key.lower()] = value
    if bounds["max_concurrency"] is not None and bounds["max_concurrency"] < (
        bounds["min_concurrency"] or 1
    ):
        err(
            f"{where}['MAX_CONCURRENCY'] (POOL_{name.upper()}_MAX_CONCURRENCY)",
            f"must be at least MIN_CONCURRENCY ({bounds['min_concurrency']})",
        )
        bounds["max_concurrency"] = None
    return PoolConfig(
        adaptive=adaptive,
        min_concurrency=bounds["min_concurrency"] or 1,
        max_concurrency=bounds["max_concurrency"],
        **deadlines,
        max_retries=max_retries,
        name=name,
        model=model,
        temperature=float(temperature),
        size=size,
        max_overflow=max_overflow,
        timeout=float(timeout),
        max_waiting=max_waiting,
        size_explicit=size_explicit,
    )
