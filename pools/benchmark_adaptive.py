"""The learned concurrency limit against fixed pool sizes and unbounded overflow.

One upstream with a capacity (concurrent requests; past it, 429 with a short Retry-After, and
time to first token rising with the load) that halves and then doubles during each run. The
same closed-loop stream of calls (a fixed number of callers, each calling again as soon as
its call ends) runs against:

- `adaptive`: the pool with its learned limit (the product's default);
- `fixed-N`: `ADAPTIVE=0`, `SIZE=N`, `MAX_OVERFLOW=0`: at most N calls, the rest queue;
- `unbounded`: `ADAPTIVE=0` and the design note's unbounded temporary connections, on this
  engine (so its 429s are still waited out);
- `note`: the design note's pool itself: a shared SDK client that never waits for a slot,
  with the SDK's own retries (two, honouring Retry-After) and nothing else.

Each variant's turn comes in a shuffled order every round, so drift on the machine hits them
all alike. Each caller runs jobs of three calls one after the other (as a design's agents
each need the one before), and a job whose call fails (its deadline passed in a queue or in
a pause, or a 429 it could not wait out) is lost, as a design with a failed agent is:
goodput is the calls of whole jobs per second. Plain asyncio; `manage.py benchmark_adaptive`
runs it against a simulator in a child process.
"""

from __future__ import annotations

import asyncio
import random
import statistics
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
from openai import AsyncOpenAI

from pools.engine.config import parse_config
from pools.engine.exceptions import PoolError, RateLimited
from pools.engine.registry import PoolRegistry

MESSAGES = [{"role": "user", "content": "Say hello in a few words."}]
MODEL = "gpt-4o"


@dataclass(frozen=True)
class Scenario:
    capacities: tuple[int, ...] = (16, 8, 16)  # the upstream's capacity in each phase
    phase_s: float = 20.0
    callers: int = 48
    call_timeout_s: float = 30.0
    fixed_sizes: tuple[int, ...] = (4, 8, 12, 16)
    warm_size: int = 16  # warm connections of adaptive and unbounded: the largest fixed size
    job_calls: int = 3  # calls one after the other, each needing the one before


@dataclass
class RunResult:
    variant: str
    succeeded: int = 0
    failed_on_429: int = 0
    failed_other: int = 0
    duration_s: float = 0.0
    # (seconds since the start, limit) for the adaptive variant
    limit_samples: list[tuple[float, int]] = field(default_factory=list)
    upstream_429s: int = 0
    jobs_failed: int = 0
    succeeded_at: list[float] = field(default_factory=list)  # seconds since the start

    def phase_goodput(self, scenario: Scenario) -> list[float]:
        counts = [0] * len(scenario.capacities)
        for at in self.succeeded_at:
            counts[min(int(at // scenario.phase_s), len(counts) - 1)] += 1
        return [round(count / scenario.phase_s, 2) for count in counts]

    @property
    def goodput(self) -> float:
        return self.succeeded / self.duration_s if self.duration_s else 0.0


def _variant_config(base_url: str, variant: str, scenario: Scenario) -> dict[str, Any]:
    pool: dict[str, Any] = {
        "MODEL": MODEL,
        "CALL_TIMEOUT": scenario.call_timeout_s,
        "FIRST_TOKEN_TIMEOUT": scenario.call_timeout_s,
        "TIMEOUT": scenario.call_timeout_s,
        "MAX_RETRIES": 2,
    }
    if variant == "adaptive":
        pool |= {"SIZE": scenario.warm_size}
    elif variant == "unbounded":
        pool |= {"SIZE": scenario.warm_size, "ADAPTIVE": False}
    else:
        size = int(variant.removeprefix("fixed-"))
        pool |= {"SIZE": size, "MAX_OVERFLOW": 0, "ADAPTIVE": False}
    return {
        "ENDPOINT": {"SIMULATOR_URL": base_url},
        "POOLS": {"main": pool},
        "HTTP": {"MAX_CONNECTIONS": 200, "MAX_KEEPALIVE_CONNECTIONS": 200},
    }


def is_429_failure(exc: BaseException) -> bool:
    """A call that failed because of the endpoint's 429s (not a queue or another fault)."""
    if isinstance(exc, openai.RateLimitError):
        return True
    return isinstance(exc, RateLimited) and "asked to wait" in str(exc)


async def _set_capacity(control: httpx.AsyncClient, capacity: int) -> None:
    response = await control.post("/_simulator/faults", json={"capacity": capacity})
    response.raise_for_status()


async def run_variant(
    root_url: str, variant: str, scenario: Scenario, control: httpx.AsyncClient
) -> RunResult:
    """One run of the whole stream of calls through one variant's pool."""
    await _set_capacity(control, scenario.capacities[0])
    stats_before = (await control.get("/_simulator/stats")).json()
    result = RunResult(variant)
    registry: PoolRegistry | None = None
    if variant == "note":
        http = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        )
        sdk = AsyncOpenAI(
            base_url=f"{root_url}/v1",
            api_key="simulator",
            http_client=http,
            timeout=scenario.call_timeout_s,
        )

        async def one_call() -> None:
            stream = await sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
            async for _ in stream:
                pass

        async def close() -> None:
            await sdk.close()
            await http.aclose()
    else:
        registry = PoolRegistry(parse_config(_variant_config(f"{root_url}/v1", variant, scenario)))
        await registry.initialize()

        async def one_call() -> None:
            async with registry.acquire("main") as llm:
                await llm.astream(MESSAGES).text()

        close = registry.close
    loop = asyncio.get_running_loop()
    started = loop.time()
    stop_at = started + scenario.phase_s * len(scenario.capacities)

    async def job(done_at: list[float]) -> bool:
        """A chain of calls, as an agent chain of a design: one failure loses the job."""
        for _ in range(scenario.job_calls):
            try:
                await one_call()
                done_at.append(loop.time() - started)
            except (PoolError, openai.OpenAIError, TimeoutError) as exc:
                if loop.time() >= stop_at:
                    return False  # the run ended under it: neither goodput nor a failure
                if is_429_failure(exc):
                    result.failed_on_429 += 1
                else:
                    result.failed_other += 1
                result.jobs_failed += 1
                return False
        return loop.time() <= stop_at

    async def caller() -> None:
        while loop.time() < stop_at:
            done_at: list[float] = []
            if await job(done_at):
                result.succeeded += len(done_at)
                result.succeeded_at += done_at

    async def conductor() -> None:
        limiter = registry.limiters[MODEL] if registry is not None else None
        for phase, capacity in enumerate(scenario.capacities):
            if phase:
                await _set_capacity(control, capacity)
            phase_end = started + scenario.phase_s * (phase + 1)
            while loop.time() < phase_end:
                if limiter is not None:
                    result.limit_samples.append((loop.time() - started, limiter.limit))
                await asyncio.sleep(0.05)

    callers = [asyncio.create_task(caller()) for _ in range(scenario.callers)]
    await conductor()
    for task in callers:
        task.cancel()
    await asyncio.gather(*callers, return_exceptions=True)
    result.duration_s = stop_at - started
    await close()
    stats_after = (await control.get("/_simulator/stats")).json()
    result.upstream_429s = stats_after["status_counts"].get("429", 0) - stats_before[
        "status_counts"
    ].get("429", 0)
    return result


def reconverge_seconds(result: RunResult, scenario: Scenario, band: float = 0.3) -> float:
    """After each capacity change, how long until the limit is within `band` of the new
    capacity (the longest over the changes; the run's rest if it never got there)."""
    worst = 0.0
    for phase, capacity in enumerate(scenario.capacities[1:], start=1):
        change_at = scenario.phase_s * phase
        phase_end = change_at + scenario.phase_s
        low, high = capacity * (1 - band), capacity * (1 + band)
        reached = next(
            (
                at - change_at
                for at, limit in result.limit_samples
                if change_at <= at < phase_end and low <= limit <= high
            ),
            scenario.phase_s,
        )
        worst = max(worst, reached)
    return worst


async def run_benchmark(
    root_url: str, scenario: Scenario, rounds: int = 1, seed: int = 0
) -> dict[str, list[RunResult]]:
    """Every variant once per round, in a shuffled order each round."""
    variants = [
        "adaptive",
        "note",
        "unbounded",
        *(f"fixed-{size}" for size in scenario.fixed_sizes),
    ]
    results: dict[str, list[RunResult]] = {variant: [] for variant in variants}
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=root_url, timeout=10) as control:
        for _ in range(rounds):
            order = variants[:]
            rng.shuffle(order)
            for variant in order:
                results[variant].append(await run_variant(root_url, variant, scenario, control))
                await asyncio.sleep(0.5)  # let the upstream's in-flight requests drain
    return results


def summarise(results: dict[str, list[RunResult]], scenario: Scenario) -> dict[str, Any]:
    rows = {
        variant: {
            "goodput_per_s": round(statistics.median(r.goodput for r in runs), 2),
            "by_phase": runs[0].phase_goodput(scenario),
            "succeeded": sum(r.succeeded for r in runs),
            "failed_on_429": sum(r.failed_on_429 for r in runs),
            "jobs_failed": sum(r.jobs_failed for r in runs),
            "failed_other": sum(r.failed_other for r in runs),
            "upstream_429s": sum(r.upstream_429s for r in runs),
        }
        for variant, runs in results.items()
    }
    fixed = {v: row for v, row in rows.items() if v.startswith("fixed-")}
    best_fixed = max(fixed, key=lambda v: fixed[v]["goodput_per_s"])
    adaptive = rows["adaptive"]["goodput_per_s"]
    return {
        "rows": rows,
        "best_fixed": best_fixed,
        "adaptive_over_best_fixed": round(adaptive / fixed[best_fixed]["goodput_per_s"], 3),
        "adaptive_over_note": round(adaptive / max(rows["note"]["goodput_per_s"], 1e-9), 3),
        "adaptive_over_unbounded": round(
            adaptive / max(rows["unbounded"]["goodput_per_s"], 1e-9), 3
        ),
        "reconverge_s": round(
            max(reconverge_seconds(run, scenario) for run in results["adaptive"]), 2
        ),
        "failed_on_429": rows["adaptive"]["failed_on_429"],
        "limit_trace": [
            (round(at, 2), limit) for at, limit in results["adaptive"][0].limit_samples[::10]
        ],
    }


def format_report(summary: dict[str, Any], scenario: Scenario) -> str:
    lines = [
        f"upstream capacity by phase {list(scenario.capacities)}, {scenario.phase_s:g} s each; "
        f"{scenario.callers} callers; call deadline {scenario.call_timeout_s:g} s",
        "",
        f"{'variant':<11} {'goodput/s':>9} {'by phase':>20} {'ok':>6} {'failed 429':>10} "
        f"{'failed other':>12} {'upstream 429s':>13}",
    ]
    for variant, row in summary["rows"].items():
        lines.append(
            f"{variant:<11} {row['goodput_per_s']:>9.2f} "
            f"{' / '.join(f'{g:g}' for g in row['by_phase']):>20} {row['succeeded']:>6} "
            f"{row['failed_on_429']:>10} {row['failed_other']:>12} {row['upstream_429s']:>13}"
        )
    trace = " ".join(f"{at:g}s:{limit}" for at, limit in summary["limit_trace"])
    lines += [
        "",
        f"adaptive limit over time: {trace}",
        f"best fixed size: {summary['best_fixed']}",
        f"adaptive/unbounded overflow on this engine (ADAPTIVE=0, 429s waited out): "
        f"{summary['adaptive_over_unbounded']}",
        f"goodput adaptive/best_fixed={summary['adaptive_over_best_fixed']} "
        f"adaptive/unbounded={summary['adaptive_over_note']} "
        f"reconverge_s={summary['reconverge_s']} failed_on_429={summary['failed_on_429']}",
    ]
    return "\n".join(lines)
