"""`manage.py warm_pools`: open every pool's connections and make one small call per pool,
then say plainly what is wrong when that fails (the design note's "Startup failures").

The command's own lines are the whole report: the engine's progress lines for a server
("✅ Connection pool ready: 0 main" after a failed connect, "probed again in the background"
from a command that exits) would contradict them, so they are held back while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
from django.core.management.base import BaseCommand, CommandError, CommandParser

from pools.engine.config import ConfigError, EndpointConfig, PoolsConfig
from pools.engine.exceptions import PoolError
from pools.engine.registry import PoolRegistry
from pools.runtime import load_config

PING = [{"role": "user", "content": "ping"}]


@dataclass
class WarmResult:
    pool: str
    model: str
    size: int
    connections_opened: int = 0
    connect_ms: float | None = None
    first_call_ms: float | None = None
    ok: bool = False
    problem: str = ""  # one line: what failed
    advice: str = ""  # what to check


def _settings_for(endpoint: EndpointConfig) -> tuple[str, str]:
    """The variables an operator sets for this endpoint: (URL variable, key variable)."""
    if endpoint.kind == "azure":
        return "AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY"
    if endpoint.kind == "openai":
        return "LLM_BASE_URL", "LLM_API_KEY"
    return "LLM_SIMULATOR_HOST / LLM_SIMULATOR_PORT", "the simulator's --api-key"


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def diagnose(
    exc: BaseException, endpoint: EndpointConfig, pool: str, model: str
) -> tuple[str, str]:
    """(problem, advice) for a failed first call, in the note's checklist terms."""
    url_var, key_var = _settings_for(endpoint)
    where = endpoint.public_url
    deployment_var = (
        "AZURE_OPENAI_MINI_DEPLOYMENT_NAME" if pool == "mini" else "AZURE_OPENAI_DEPLOYMENT_NAME"
    )
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return (
            f"HTTP {exc.status_code}: the endpoint refused the API key",
            f"check {key_var} (set, not expired, for this resource: {where})",
        )
    if (
        isinstance(exc, openai.NotFoundError)
        and endpoint.kind != "azure"
        and not (urlsplit(endpoint.base_url).path.strip("/"))
    ):
        return (
            f"HTTP 404 at {where}/chat/completions: {url_var} has no API path, so the calls "
            "miss the API",
            f"OpenAI-compatible servers serve under a path, most often /v1: set {url_var} to "
            f"{where}/v1 (or the path your server documents)",
        )
    if isinstance(exc, openai.NotFoundError):
        name = "deployment" if endpoint.kind == "azure" else "model"
        return (
            f"HTTP 404: unknown {name} {model!r} at {where}",
            f"check {deployment_var if endpoint.kind == 'azure' else 'the pool MODEL'} and, for "
            f"Azure, that the deployment exists in this resource"
            + (" and AZURE_OPENAI_API_VERSION" if endpoint.kind == "azure" else ""),
        )
    if isinstance(exc, openai.RateLimitError):
        return (
            "HTTP 429: the endpoint is rate limiting this key",
            "wait, or raise the deployment's quota (tokens and requests per minute)",
        )
    if isinstance(exc, openai.APIStatusError):
        return (
            f"HTTP {exc.status_code} from the endpoint",
            f"the service at {where} answers but fails; check its status page or logs",
        )
    chain = _causes(exc)
    for cause in chain:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return (
                f"TLS certificate not trusted ({cause.verify_message or cause.reason})",
                f"check {url_var} uses the right host name; for a private CA set LLM_CA_BUNDLE",
            )
        if isinstance(cause, ssl.SSLError):
            return (
                f"TLS error ({cause.reason or cause})",
                f"check {url_var}: is it https on a port that speaks TLS?",
            )
        if isinstance(cause, socket.gaierror):
            return (
                f"DNS: cannot resolve the host of {where}",
                f"check {url_var} for a typo, and DNS / network access from this machine",
            )
        if isinstance(cause, ConnectionRefusedError):
            advice = f"check {url_var} and that the service is up; firewall / network settings"
            if endpoint.kind == "simulator":
                advice = (
                    "no simulator is running there: start `manage.py llm_simulator` (or use "
                    f"`manage.py serve`, which starts it), or set {url_var}"
                )
            return f"connection refused by {where}: nothing listens there", advice
    if any(isinstance(c, TimeoutError | httpx.TimeoutException) for c in chain) or isinstance(
        exc, openai.APITimeoutError
    ):
        return (
            f"timed out talking to {where}",
            "check firewall / network settings and HTTP_CONNECT_TIMEOUT / HTTP_READ_TIMEOUT",
        )
    if isinstance(exc, openai.APIConnectionError):
        return (
            f"cannot connect to {where} ({type(chain[-1]).__name__}: {chain[-1]})",
            f"check {url_var} and firewall / network settings",
        )
    if isinstance(exc, PoolError):
        return f"the pool refused the call ({type(exc).__name__}: {exc})", "see pool_status"
    return f"{type(exc).__name__}: {exc}", "see the server log for the traceback"


@contextlib.contextmanager
def _engine_quiet() -> Iterator[None]:
    """Hold back the engine's log below CRITICAL: what it says, the command says better."""
    engine = logging.getLogger("pools")
    level = engine.level
    engine.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        engine.setLevel(level)


class Command(BaseCommand):
    help = (
        "Check that every LLM pool can start: for each pool, open its connections to the "
        "configured endpoint (as the server's warm-up does), make one tiny call (max_tokens=1), "
        "and report the connect time, the first call's latency, and when something fails, what "
        "and where to look (bad key -> 401, unknown deployment -> 404, nothing listening -> "
        "connection refused, wrong host -> DNS, untrusted certificate -> TLS). Reads the same "
        "settings as the server. Exit status 0 when every pool is warm, 1 otherwise."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--pool", action="append", help="Only this pool (repeatable).")
        parser.add_argument(
            "--timeout",
            type=float,
            default=30.0,
            help="Seconds allowed for each pool's warm-up and for its call (default 30).",
        )
        parser.add_argument("--json", action="store_true", help="Print JSON instead of text.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            config = load_config()
        except ConfigError as exc:
            raise CommandError(f"the pool configuration is invalid: {exc}") from None
        names = options["pool"] or list(config.pools)
        unknown = sorted(set(names) - set(config.pools))
        if unknown:
            raise CommandError(f"unknown pool(s) {unknown}; configured: {sorted(config.pools)}")
        endpoint = config.endpoint
        if not options["json"]:
            self.stdout.write(
                f"Warming {len(names)} pool(s) at {endpoint.kind} {endpoint.public_url}"
            )
        with _engine_quiet():
            results = asyncio.run(self._warm_all(config, names, options["timeout"]))
        if options["json"]:
            payload = {
                "endpoint": {"kind": endpoint.kind, "url": endpoint.public_url},
                "pools": [asdict(result) for result in results],
            }
            self.stdout.write(json.dumps(payload, indent=2))
        else:
            for result in results:
                self.stdout.write(self._line(result))
        failed = [result.pool for result in results if not result.ok]
        if failed:
            raise CommandError(
                f"{len(failed)} of {len(results)} pool(s) failed to warm: {', '.join(failed)}"
            )
        if not options["json"]:
            self.stdout.write(self.style.SUCCESS(f"✅ All {len(results)} pool(s) are warm."))

    def _line(self, result: WarmResult) -> str:
        connect = "-" if result.connect_ms is None else f"{result.connect_ms:.1f} ms"
        first = "-" if result.first_call_ms is None else f"{result.first_call_ms:.1f} ms"
        head = (
            f"{'✅' if result.ok else '❌'} {result.pool:<8} {result.model:<16} "
            f"connections {result.connections_opened}/{result.size}, connect {connect}, "
            f"first call {first}"
        )
        if result.ok:
            return head
        return f"{head}\n   problem: {result.problem}\n   advice:  {result.advice}"

    async def _warm_all(
        self, config: PoolsConfig, names: list[str], timeout: float
    ) -> list[WarmResult]:
        # One registry per pool, warmed in turn, so each pool's connect time is its own.
        return [await self._warm_one(config, name, timeout) for name in names]

    async def _warm_one(self, config: PoolsConfig, name: str, timeout: float) -> WarmResult:
        pool = config.pools[name]
        result = WarmResult(pool=name, model=pool.model, size=pool.size)
        registry = PoolRegistry(replace(config, pools={name: pool}))
        try:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(timeout):
                    await registry.initialize()
            except TimeoutError:
                result.problem, result.advice = diagnose(
                    TimeoutError(), config.endpoint, name, pool.model
                )
                return result
            result.connections_opened = registry.ledger.for_pool(name)["connections_num"]
            if registry.warmup_error is None:  # no connect time for connections never made
                result.connect_ms = (time.perf_counter() - started) * 1000
            try:
                async with asyncio.timeout(timeout), registry.acquire(name) as llm:
                    started = time.perf_counter()
                    # The SDK call itself, without the pool's retries: one attempt, one answer.
                    await llm.client.chat.completions.create(
                        model=llm.model, temperature=llm.temperature, messages=PING, max_tokens=1
                    )
                    result.first_call_ms = (time.perf_counter() - started) * 1000
            except Exception as exc:
                result.problem, result.advice = diagnose(exc, config.endpoint, name, pool.model)
                return result
            if result.connections_opened < pool.size:
                result.problem = (
                    f"only {result.connections_opened} of {pool.size} connections opened "
                    f"({registry.warmup_error or 'see the log'})"
                )
                result.advice = "check HTTP_MAX_CONNECTIONS and the endpoint's connection limit"
                return result
            result.ok = True
            return result
        finally:
            await registry.close()
