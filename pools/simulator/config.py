"""What the simulator is told to do and what it counts.

`SimulatorConfig` is every setting; those in `FAULT_FIELDS` can also be changed on a running
server (`LLMSimulator.apply_faults`, `POST /_simulator/faults`), checked by kind so a typo in
a test or a curl call is refused with a message instead of silently ignored.
"""

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = [
    "FAULT_CHOICES",
    "FAULT_FIELDS",
    "QUOTA_DEFAULT_MAX_TOKENS",
    "SimulatorConfig",
    "SimulatorStats",
    "clean_fault_value",
]

# Tokens the quota charges for a chat request that sets no max_tokens, as Azure does.
QUOTA_DEFAULT_MAX_TOKENS = 1000


@dataclass
class SimulatorConfig:
    """How the simulator behaves; mutable on a running server (tests flip fault rates live)."""

    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port (a restart then reuses the one picked)
    tls: bool = False  # self-signed certificate from an in-memory trustme CA
    ttft_ms: float = 0.0  # time to first token
    tokens_per_second: float = 0.0  # 0 = as fast as possible
    rtt_ms: float = 0.0  # per new connection (twice with TLS) and per request
    capacity: int = 0  # max concurrent chat requests, beyond -> 429 (0 = unlimited)
    retry_after_s: float = 1.0  # advertised on 429 (retry-after, retry-after-ms)
    error_rate: float = 0.0  # fraction of chat requests answered 500
    reset_rate: float = 0.0  # fraction of streams reset (RST) after a few chunks
    stall_rate: float = 0.0  # fraction of chat responses that stop mid-way ...
    stall_seconds: float = 30.0  # ... for this long
    api_key: str | None = None  # when set, other keys get 401 (Bearer or Azure api-key)
    deployments: tuple[str, ...] | None = None  # when set, other models/deployments get 404
    seed: int = 0  # fault draws come from random.Random(seed): runs are reproducible
    keepalive_timeout_s: float = 120.0  # idle connections are closed after this (0 = never)
    # Per (API key, model/deployment) quota over a sliding window, as Azure OpenAI deployments
    # have; 0 = off. TPM is charged on arrival: prompt + (max_tokens or the default).
    quota_rpm: int = 0
    quota_tpm: int = 0
    quota_window_s: float = 60.0
    ttft_per_request_ms: float = 0.0  # added to ttft_ms per other chat request in flight
    retry_after_mode: str = "both"  # on every 429: both | seconds | ms | date | none
    ratelimit_headers: str = "real"  # x-ratelimit-*: real | none | negative (-1 everywhere)
    next_429: int = 0  # the next N chat requests get 429 (counts down)
    fault_model: str = ""  # when set, injected faults hit only this model/deployment
    truncate_rate: float = 0.0  # streams that end cleanly after a few chunks, unfinished
    malformed_rate: float = 0.0  # streams that send one broken SSE event, then end
    empty_rate: float = 0.0  # answers with no content (finish_reason "stop")
    length_rate: float = 0.0  # answers cut at half, finish_reason "length"
    content_filter_rate: float = 0.0  # answers cut at a third, finish_reason "content_filter"
    no_usage: int = 0  # 1 = never send usage (streams ignore include_usage; usage: null)
    request_log: int = 0  # keep the last N chat requests for GET /_simulator/requests (0 = off)

    def faults_apply_to(self, model: str) -> bool:
        """Whether injected faults hit `model` (all models unless `fault_model` names one)."""
        return not self.fault_model or model == self.fault_model


# Settings that POST /_simulator/faults (and LLMSimulator.apply_faults) may change live,
# with the kind of value each accepts.
# Kinds: "rate" (a fraction 0..1), "number" (>= 0), "positive" (> 0), "count" (a whole
# number >= 0), "flag" (0 or 1), "choice" (one of FAULT_CHOICES[field]), "text" (a string).
FAULT_FIELDS: dict[str, str] = {
    "error_rate": "rate",
    "reset_rate": "rate",
    "stall_rate": "rate",
    "stall_seconds": "number",
    "capacity": "count",
    "ttft_ms": "number",
    "tokens_per_second": "number",
    "rtt_ms": "number",
    "retry_after_s": "number",
    "quota_rpm": "count",
    "quota_tpm": "count",
    "quota_window_s": "positive",
    "ttft_per_request_ms": "number",
    "retry_after_mode": "choice",
    "ratelimit_headers": "choice",
    "next_429": "count",
    "fault_model": "text",
    "truncate_rate": "rate",
    "malformed_rate": "rate",
    "empty_rate": "rate",
    "length_rate": "rate",
    "content_filter_rate": "rate",
    "no_usage": "flag",
    "keepalive_timeout_s": "number",
}

# The values each "choice" setting accepts.
FAULT_CHOICES: dict[str, tuple[str, ...]] = {
    "retry_after_mode": ("both", "seconds", "ms", "date", "none"),
    "ratelimit_headers": ("real", "none", "negative"),
}


def clean_fault_value(key: str, value: Any) -> Any:
    """One live setting checked against its kind; raises ValueError saying what is wrong."""
    kind = FAULT_FIELDS[key]
    if kind == "choice":
        allowed = FAULT_CHOICES[key]
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {json.dumps(value)}")
        return value
    if kind == "text":
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {json.dumps(value)}")
        return value
    if kind == "flag":
        if value not in (0, 1):  # True and False are 1 and 0
            raise ValueError(f"{key} must be 0 or 1, got {json.dumps(value)}")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number, got {json.dumps(value)}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{key} must be a finite number >= 0, got {value}")
    if kind == "positive" and value == 0:
        raise ValueError(f"{key} must be greater than 0, got {value}")
    if kind == "rate" and value > 1:
        raise ValueError(f"{key} is a fraction and must be between 0 and 1, got {value}")
    if kind == "count":
        if value != int(value):
            raise ValueError(f"{key} must be a whole number, got {value}")
        return int(value)
    return float(value)


# Live gauges: what is open or running now, which a reset of the counters must keep.
_GAUGES = frozenset({"connections_open", "in_flight", "peak_in_flight", "status_counts"})


@dataclass
class SimulatorStats:
    """Exact wire-level counters; tests use them to prove connection reuse and fault counts."""

    connections_accepted: int = 0
    connections_open: int = 0
    requests_total: int = 0
    chat_requests: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    status_counts: dict[int, int] = field(default_factory=dict)
    resets: int = 0
    stalls: int = 0
    rate_limited: int = 0  # 429s sent, whatever the cause
    quota_rejections: int = 0  # 429s because a quota_rpm/quota_tpm window was full
    truncations: int = 0  # streams ended cleanly without finish_reason / [DONE]
    malformed: int = 0  # streams that carried a broken SSE event
    empties: int = 0  # empty answers sent
    idle_closes: int = 0  # keep-alive connections the server closed for being idle

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready copy (status codes become string keys, as JSON requires)."""
        data = asdict(self)
        data["status_counts"] = {str(k): v for k, v in sorted(self.status_counts.items())}
        return data

    def count_status(self, status: int) -> None:
        """One response sent with `status`."""
        self.status_counts[status] = self.status_counts.get(status, 0) + 1
        if status == 429:
            self.rate_limited += 1

    def reset_counters(self) -> None:
        """Zero the counters in place (callers may hold this object); keep the live gauges."""
        for counter in fields(self):
            if counter.name not in _GAUGES:
                setattr(self, counter.name, 0)
        self.peak_in_flight = self.in_flight
        self.status_counts.clear()
