"""Back-pressure as hosted endpoints apply it: capacity, per-key quotas, scripted 429s.

Also how limits are advertised: every variant of retry-after / retry-after-ms and of the
x-ratelimit-* headers clients have to cope with, so the pools are tested against them all.
"""

import asyncio
import email.utils
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence

from pools.simulator.config import SimulatorConfig, SimulatorStats
from pools.simulator.validation import presented_key
from pools.simulator.wire import Connection, HTTPError, Request

__all__ = ["QuotaWindow", "RateLimits", "duration"]

# Advertised limits when no capacity is configured: large, so clients never back off.
_UNLIMITED_REQUESTS = 10_000
_TOKENS_PER_REQUEST_SLOT = 30_000
ORGANIZATION = "org-carlos-simulator"
_QUOTA_INCREASE_HINT = (
    "Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase "
    "the default rate limit."
)
_RATE_LIMIT_HINT = "Visit https://platform.openai.com/account/rate-limits to learn more."


def duration(seconds: float) -> str:
    """OpenAI's reset-header style: '250ms', '1s', '1.5s', '6m0s', '1h0m0s'."""
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    text = f"{rest / 1000:g}s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


class QuotaWindow:
    """A sliding-window log of (arrival time, tokens charged) for one (API key, model).

    A log rather than a token bucket, so the wait for room is exact: it is when the entries
    that must leave the window to make room do.
    """

    def __init__(self) -> None:
        self.entries: deque[tuple[float, int]] = deque()
        self.tokens = 0

    def prune(self, now: float, window: float) -> None:
        cutoff = now - window
        while self.entries and self.entries[0][0] <= cutoff:
            _, tokens = self.entries.popleft()
            self.tokens -= tokens

    def request_wait(self, now: float, window: float, limit: int) -> float:
        """Seconds until one more request fits under `limit` (0 = now)."""
        if limit <= 0 or len(self.entries) < limit:
            return 0.0
        # The oldest len - limit + 1 entries must leave the window first.
        return self.entries[len(self.entries) - limit][0] + window - now

    def token_wait(self, now: float, window: float, limit: int, cost: int) -> float:
        """Seconds until `cost` more tokens fit under `limit` (inf = never)."""
        if limit <= 0 or self.tokens + cost <= limit:
            return 0.0
        if cost > limit:
            return math.inf
        excess = self.tokens + cost - limit
        freed = 0
        for arrived, tokens in self.entries:
            freed += tokens
            if freed >= excess:
                return arrived + window - now
        return 0.0  # unreachable: freeing every entry always makes room

    def request_reset(self, now: float, window: float) -> float:
        """Seconds until the oldest entry leaves the window."""
        return self.entries[0][0] + window - now if self.entries else 0.0

    def token_reset(self, now: float, window: float) -> float:
        """Seconds until the oldest entry that holds tokens leaves the window."""
        for arrived, tokens in self.entries:
            if tokens:
                return arrived + window - now
        return 0.0


class RateLimits:
    """The quota windows per (API key, model/deployment) and the tokens reserved in flight.

    Reads the live `config` on every call, so a change through POST /_simulator/faults
    applies to the next request.
    """

    def __init__(self, config: SimulatorConfig, stats: SimulatorStats) -> None:
        self.config = config
        self.stats = stats
        self.quotas: dict[tuple[str, str], QuotaWindow] = {}
        self.tokens_in_flight = 0

    # --- what every response advertises -------------------------------------------------

    def headers(
        self,
        windows: Sequence[QuotaWindow],
        *,
        exhausted: Sequence[str] = (),
        resets: Mapping[str, float] | None = None,
    ) -> list[tuple[str, str]]:
        """x-ratelimit-* headers: the quota's real numbers when one is set, else capacity's.

        `exhausted` kinds ("requests", "tokens") are advertised with 0 remaining; `resets`
        overrides the reset time of a kind (the exact wait of a 429).
        """
        cfg = self.config
        if cfg.ratelimit_headers == "none":
            return []
        limit_requests = cfg.capacity if cfg.capacity > 0 else _UNLIMITED_REQUESTS
        limit_tokens = limit_requests * _TOKENS_PER_REQUEST_SLOT
        remaining_requests = max(0, limit_requests - self.stats.in_flight)
        remaining_tokens = max(0, limit_tokens - self.tokens_in_flight)
        reset_requests = reset_tokens = max(cfg.retry_after_s, 0.001)
        if windows:
            # A models list is checked against several windows: show the fullest.
            window = max(windows, key=lambda w: (len(w.entries), w.tokens))
            now = asyncio.get_running_loop().time()
            window.prune(now, cfg.quota_window_s)
            if cfg.quota_rpm > 0:
                limit_requests = cfg.quota_rpm
                remaining_requests = max(0, cfg.quota_rpm - len(window.entries))
                reset_requests = window.request_reset(now, cfg.quota_window_s)
            if cfg.quota_tpm > 0:
                limit_tokens = cfg.quota_tpm
                remaining_tokens = max(0, cfg.quota_tpm - window.tokens)
                reset_tokens = window.token_reset(now, cfg.quota_window_s)
        if "requests" in exhausted:
            remaining_requests = 0
        if "tokens" in exhausted:
            remaining_tokens = 0
        resets = resets or {}
        reset_requests = resets.get("requests", reset_requests)
        reset_tokens = resets.get("tokens", reset_tokens)
        numbers = [limit_requests, remaining_requests, limit_tokens, remaining_tokens]
        if cfg.ratelimit_headers == "negative":
            numbers = [-1] * 4
        return [
            ("x-ratelimit-limit-requests", str(numbers[0])),
            ("x-ratelimit-remaining-requests", str(numbers[1])),
            ("x-ratelimit-reset-requests", duration(reset_requests)),
            ("x-ratelimit-limit-tokens", str(numbers[2])),
            ("x-ratelimit-remaining-tokens", str(numbers[3])),
            ("x-ratelimit-reset-tokens", duration(reset_tokens)),
        ]

    def retry_after_headers(self, seconds: float, ms: int | None = None) -> list[tuple[str, str]]:
        """retry-after / retry-after-ms as retry_after_mode says (ms defaults to round(s))."""
        seconds = max(seconds, 0.0)
        if ms is None:
            ms = round(seconds * 1000)
        mode = self.config.retry_after_mode
        whole = ("retry-after", str(math.ceil(seconds)))
        millis = ("retry-after-ms", str(ms))
        if mode == "both":
            return [whole, millis]
        if mode == "seconds":
            return [whole]
        if mode == "ms":
            return [millis]
        if mode == "date":
            at = math.ceil(time.time() + seconds)  # rounded up: never earlier than the wait
            return [("retry-after", email.utils.formatdate(at, usegmt=True))]
        return []

    # --- 429s ----------------------------------------------------------------------------

    def _busy_headers(self, conn: Connection) -> tuple[float, list[tuple[str, str]]]:
        """The configured wait and the headers of a 429 that is not a quota's."""
        wait = max(self.config.retry_after_s, 0.0)
        return wait, [
            *self.retry_after_headers(wait),
            *self.headers(conn.quota_windows, exhausted=("requests",)),
        ]

    def too_many_requests(self, conn: Connection) -> HTTPError:
        """The 429 for a request beyond `capacity` concurrent ones."""
        retry_after, headers = self._busy_headers(conn)
        return HTTPError(
            429,
            f"Rate limit reached: the simulator is configured for {self.config.capacity} "
            f"concurrent request(s). Please try again in {retry_after:g}s.",
            type_="requests",
            code="rate_limit_exceeded",
            headers=headers,
        )

    def scripted_429(self, conn: Connection, req: Request, model: str) -> HTTPError:
        """The 429 `next_429` asked for."""
        wait, headers = self._busy_headers(conn)
        return _rate_limit_error(
            req,
            operation="ChatCompletions_Create",
            kind="requests",
            wait=wait,
            headers=headers,
            detail=f"Rate limit reached for {model} in organization {ORGANIZATION} on "
            f"requests per min (RPM). Please try again in {duration(wait)}.",
        )

    # --- quotas --------------------------------------------------------------------------

    def check(
        self,
        conn: Connection,
        req: Request,
        model: str | None,
        cost: int,
        operation: str,
        listed: Sequence[str] = (),
    ) -> list[QuotaWindow]:
        """The quota windows this request is charged to; raises the 429 if one is full.

        Quotas are per (API key presented, model/deployment). A request naming no model
        (a models list) is counted against every model of that key: the `listed` ones and
        any it has used.
        """
        cfg = self.config
        if cfg.quota_rpm <= 0 and cfg.quota_tpm <= 0:
            return []
        key = presented_key(req)
        if model is None:
            models = sorted({*listed, *(m for k, m in self.quotas if k == key)})
        else:
            models = [model]
        now = asyncio.get_running_loop().time()
        span = cfg.quota_window_s
        windows = []
        for name in models:
            window = self.quotas.setdefault((key, name), QuotaWindow())
            window.prune(now, span)
            windows.append(window)
        conn.quota_windows = windows
        worst: tuple[float, float, QuotaWindow] | None = None
        for window in windows:
            request_wait = window.request_wait(now, span, cfg.quota_rpm)
            token_wait = window.token_wait(now, span, cfg.quota_tpm, cost)
            if (request_wait > 0 or token_wait > 0) and (
                worst is None or max(request_wait, token_wait) > max(worst[0], worst[1])
            ):
                worst = (request_wait, token_wait, window)
        if worst is None:
            return windows
        self.stats.quota_rejections += 1
        conn.quota_windows = [worst[2]]
        raise self._quota_error(req, model, cost, operation, *worst)

    def _quota_error(
        self,
        req: Request,
        model: str | None,
        cost: int,
        operation: str,
        request_wait: float,
        token_wait: float,
        window: QuotaWindow,
    ) -> HTTPError:
        """The 429 of a full quota window, advertising the exact wait."""
        cfg = self.config
        span = cfg.quota_window_s
        kind = "requests" if request_wait >= token_wait else "tokens"
        too_large = math.isinf(token_wait)
        # A request larger than the whole TPM never fits; advertise the full window.
        wait = span if too_large else max(request_wait, token_wait)
        ms = math.ceil(wait * 1000)
        waits = {k: w for k, w in (("requests", request_wait), ("tokens", token_wait)) if w > 0}
        headers = [
            *self.retry_after_headers(ms / 1000, ms),
            *self.headers(
                [window],
                exhausted=list(waits),
                resets={k: (span if math.isinf(w) else w) for k, w in waits.items()},
            ),
        ]
        subject = model if model is not None else "models"
        where = f"for {subject} in organization {ORGANIZATION} on"
        if too_large:
            detail = (
                f"Request too large {where} tokens per min (TPM): Limit {cfg.quota_tpm}, "
                f"Requested {cost}. The input or output tokens must be reduced in order to run "
                "successfully."
            )
        elif kind == "requests":
            detail = (
                f"Rate limit reached {where} requests per min (RPM): Limit {cfg.quota_rpm}, "
                f"Used {len(window.entries)}, Requested 1. Please try again in {duration(wait)}."
            )
        else:
            detail = (
                f"Rate limit reached {where} tokens per min (TPM): Limit {cfg.quota_tpm}, "
                f"Used {window.tokens}, Requested {cost}. Please try again in {duration(wait)}."
            )
        return _rate_limit_error(
            req, operation=operation, kind=kind, wait=wait, headers=headers, detail=detail
        )

    @staticmethod
    def consume(windows: Sequence[QuotaWindow], cost: int) -> None:
        """Charge an admitted request to the windows it was checked against."""
        now = asyncio.get_running_loop().time()
        for window in windows:
            window.entries.append((now, cost))
            window.tokens += cost

    def charge(
        self,
        conn: Connection,
        req: Request,
        model: str | None,
        operation: str,
        listed: Sequence[str] = (),
    ) -> None:
        """Check and charge a request that costs no tokens (the models endpoints)."""
        self.consume(self.check(conn, req, model, 0, operation, listed), 0)


def _rate_limit_error(
    req: Request,
    *,
    operation: str,
    kind: str,
    wait: float,
    headers: list[tuple[str, str]],
    detail: str,
) -> HTTPError:
    """A 429 in the style of the path: Azure's for /openai/..., OpenAI's for /v1/...."""
    if req.path.startswith("/openai/"):
        seconds = math.ceil(wait)
        version = req.query.get("api-version", [""])[0]
        limit = "call" if kind == "requests" else "token"
        message = (
            f"Requests to the {operation} Operation under Azure OpenAI API version "
            f"{version} have exceeded {limit} rate limit of your current OpenAI S0 pricing "
            f"tier. Please retry after {seconds} second{'' if seconds == 1 else 's'}. "
            f"{_QUOTA_INCREASE_HINT}"
        )
        return HTTPError(429, message, code="429", headers=headers, azure=True)
    return HTTPError(
        429,
        f"{detail} {_RATE_LIMIT_HINT}",
        type_=kind,
        code="rate_limit_exceeded",
        headers=headers,
    )
