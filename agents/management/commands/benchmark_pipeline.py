"""`manage.py benchmark_pipeline`: many concurrent designs against a paced in-process simulator.

Why: the design note promised concurrency it never measured. This runs N whole designs at
once through the real pipeline and pool engine, with every agent's response timed like the
original's documented stage latencies (times a scale factor), and compares the wall time
with the critical path, the time one design needs if nothing ever waits:
requirements + max(designs) + max(analysts) + auditor + recommender + terraform.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any

import httpx
from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection

from agents.models import AgentRun, Design
from agents.pipeline import create_design
from agents.simulated import agent_of, carlos_responder, in_process_endpoint
from agents.specs import STAGE_ORDER, Output, Stage, find_spec, spec_for, specs_in_stage
from agents.tasks import start_design
from carlos import telemetry
from pools import runtime
from pools.engine.config import parse_config
from pools.engine.intervals import percentile
from pools.engine.registry import PoolRegistry
from pools.runtime import get_pool
from pools.simulator import ChatRequest, SimulatorConfig, tokenize
from pools.simulator.process import start_simulator

BENCHMARK_USERNAME = "benchmark"
TARGET_RATIO = 1.15
# The report's names for the stages, as in the reports published so far.
REPORTED_STAGE_NAMES = {
    Stage.ANALYSES: "analysts",
    Stage.AUDIT: "auditor",
    Stage.RECOMMENDATION: "recommender",
}
# A model streaming this many tokens per second, time-compressed by the scale.
REAL_TOKENS_PER_SECOND = 80.0
REQUESTS = (
    "An online bookstore for 20k daily users with search and recommendations",
    "Ingest IoT telemetry from 5,000 devices and build operations dashboards",
    "Order processing microservices with payments, inventory and notifications",
    "A patient portal for a clinic network with appointment booking",
    "A multiplayer game backend with leaderboards and matchmaking",
)
_NUMBER = re.compile(r"^Benchmark design (\d+):")


@dataclass
class PacedResponder:
    """carlos_responder, delayed so each response takes its stage's planned time.

    The planned time of an agent in a design is drawn (deterministically) from its stage's
    range times the scale; the response streams at the simulator's tokens per second and
    the rest of the time is spent before the first token, as a model's queueing and prefill.
    """

    scale: float
    tokens_per_second: float
    brief: bool = False

    def plan(self, number: int, agent: str) -> float:
        return planned_seconds(number, agent, self.scale)

    async def __call__(self, request: ChatRequest) -> str:
        text = carlos_responder(request)
        agent = agent_of(request)
        if self.brief and agent is not None:
            text = condense(agent, text)
        match = _NUMBER.search(_request_line(request))
        if find_spec(agent) is None or match is None:
            return text
        number = int(match[1])
        streaming = len(tokenize(text)) / self.tokens_per_second if self.tokens_per_second else 0
        duration = max(self.plan(number, agent), streaming)
        await asyncio.sleep(duration - streaming)
        return text


def planned_seconds(number: int, agent: str, scale: float) -> float:
    """The planned time of `agent` in design `number`: drawn from the range of its spec's
    emulated seconds (the original's documented latency), fixed."""
    low, high = spec_for(agent).emulated_seconds
    digest = hashlib.sha256(f"{number}:{agent}".encode()).digest()
    fraction = int.from_bytes(digest[:4], "big") / 2**32
    return scale * (low + (high - low) * fraction)


_from_env: PacedResponder | None = None


async def paced_responder(request: ChatRequest) -> str:
    """The responder of a simulator run as a child process (`--responder` of llm_simulator):
    the benchmark passes its scale, pace and answer length through the environment."""
    global _from_env
    if _from_env is None:
        _from_env = PacedResponder(
            scale=float(os.environ["CARLOS_BENCHMARK_SCALE"]),
            tokens_per_second=float(os.environ["CARLOS_BENCHMARK_TPS"]),
            brief=os.environ.get("CARLOS_BENCHMARK_BRIEF") == "1",
        )
    return await _from_env(request)


def critical_path_of_runs(
    runs: list[AgentRun], number_of: dict[int, int], scale: float, tokens_per_second: float
) -> dict[int, float]:
    """Each design's planned time if nothing waited, from what its agents really streamed.

    Per call the simulator takes max(planned stage time, tokens / pace); a stage's time is
    its slowest member's (revision rounds add up), and the stages follow one another.
    """
    spent: dict[tuple[int, str], float] = {}
    for run in runs:
        number = number_of[run.design_id]
        streaming = run.tokens_out / tokens_per_second if tokens_per_second else 0.0
        key = (number, run.agent)
        spent[key] = spent.get(key, 0.0) + max(planned_seconds(number, run.agent, scale), streaming)
    return {
        number: sum(
            max(spent.get((number, spec.key), 0.0) for spec in specs_in_stage(stage))
            for stage in STAGE_ORDER
        )
        for number in set(number_of.values())
    }


def condense(agent: str, text: str) -> str:
    """The same format in a fraction of the tokens: every parser of the pipeline accepts it.

    Streaming costs CPU per chunk (mostly the SDK building one object per chunk); with full
    answers, many concurrent designs in one process measure that cost rather than the pools.
    """
    spec = find_spec(agent)
    if spec is not None and spec.output == Output.JSON:
        return json.dumps(_trim(json.loads(text)), separators=(",", ":"))
    return text.strip().splitlines()[0]  # the title, or the VERDICT / RECOMMEND line


def _trim(value: Any, key: str = "") -> Any:
    """Lists cut to what the schemas require, strings to two words; numbers kept."""
    if isinstance(value, dict):
        return {name: _trim(item, name) for name, item in value.items()}
    if isinstance(value, list):
        keep = 3 if key == "optimizations" else 1
        return [_trim(item, key) for item in value[:keep]]
    if isinstance(value, str):
        return " ".join(value.split()[:2])
    return value


def _request_line(request: ChatRequest) -> str:
    prompt = next((m.get("content") or "" for m in request.messages if m["role"] == "user"), "")
    start = prompt.find("<request>\n")
    return prompt[start + len("<request>\n") :] if start >= 0 else ""


class Command(BaseCommand):
    help = (
        "Run N concurrent designs through the real pipeline and pools against the simulator "
        "(a child process) paced like the original's stage latencies times --scale, and report the "
        "wall time against the critical path (target: within 1.15x). Designs are written to "
        "the configured database, owned by a 'benchmark' user."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--designs", type=int, default=50, help="Concurrent designs (50).")
        parser.add_argument(
            "--scale",
            type=float,
            default=1.0,
            help="Multiplier of the original's stage latencies (default 1: as documented; 0.1 "
            "makes a 25 s design take 2.5 s, streaming the same tokens ten times as fast).",
        )
        parser.add_argument(
            "--inline-simulator",
            action="store_true",
            help="Run the simulator inside this process instead of a child process (it then "
            "competes with the pipeline for the same CPU, unlike a real endpoint).",
        )
        parser.add_argument(
            "--tokens-per-second",
            type=float,
            default=None,
            help=f"Streaming pace per response (default {REAL_TOKENS_PER_SECOND:g} / scale).",
        )
        parser.add_argument(
            "--brief",
            action="store_true",
            help="Condensed answers (same formats, far fewer tokens), so the run measures the "
            "pools and the pipeline rather than the CPU cost of parsing streamed chunks.",
        )
        parser.add_argument("--json", action="store_true", help="Print one JSON document.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["designs"] < 1 or options["scale"] <= 0:
            raise CommandError("--designs must be at least 1 and --scale above 0.")
        if Design._meta.db_table not in connection.introspection.table_names():
            raise CommandError("The database has no design tables: run `manage.py migrate` first.")
        users = get_user_model()
        owner, created = users.objects.get_or_create(**{users.USERNAME_FIELD: BENCHMARK_USERNAME})
        if created:
            owner.set_unusable_password()
            owner.save(update_fields=["password"])
        tps = options["tokens_per_second"]
        if tps is None:
            tps = REAL_TOKENS_PER_SECOND / options["scale"]
        telemetry.setup()  # exported as by the server when OTEL_* / Application Insights say
        try:
            report = async_to_sync(self._benchmark)(
                owner,
                options["designs"],
                options["scale"],
                tps,
                options["brief"],
                options["inline_simulator"],
            )
        finally:
            telemetry.shutdown()
        report["telemetry"] = telemetry.describe()
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2))
        else:
            self.stdout.write(render_report(report))

    async def _benchmark(
        self,
        owner: Any,
        count: int,
        scale: float,
        tokens_per_second: float,
        brief: bool,
        inline: bool,
    ) -> dict[str, Any]:
        if inline:
            responder = PacedResponder(scale, tokens_per_second, brief)
            config = SimulatorConfig(tokens_per_second=tokens_per_second)
            async with in_process_endpoint(config, responder=responder) as simulator:
                measured = await self._run(owner, count)
                peak = simulator.stats.peak_in_flight
        else:
            simulator = await asyncio.to_thread(
                start_simulator,
                [
                    "--port",
                    "0",
                    "--tokens-per-second",
                    str(tokens_per_second),
                    "--responder",
                    f"{__name__}.paced_responder",
                ],
                manage_py=settings.BASE_DIR / "manage.py",
                env={
                    "CARLOS_BENCHMARK_SCALE": str(scale),
                    "CARLOS_BENCHMARK_TPS": str(tokens_per_second),
                    "CARLOS_BENCHMARK_BRIEF": "1" if brief else "0",
                },
            )
            base_url = simulator.base_url
            raw = {**settings.CARLOS_POOLS, "ENDPOINT": {"SIMULATOR_URL": base_url}}
            registry = PoolRegistry(parse_config(raw))
            previous = runtime.install(registry)
            try:
                measured = await self._run(owner, count)
                async with httpx.AsyncClient() as client:
                    stats = await client.get(simulator.root_url + "/_simulator/stats")
                peak = stats.json()["peak_in_flight"]
            finally:
                runtime.install(previous)
                if not registry.closed:
                    await registry.close()
                await asyncio.to_thread(simulator.stop)
        designs, wall, cpu, stats = measured
        ids = [design.pk for design in designs]
        number_of = {design.pk: number for number, design in enumerate(designs, start=1)}
        statuses = [
            s async for s in Design.objects.filter(pk__in=ids).values_list("status", flat=True)
        ]
        runs = [run async for run in AgentRun.objects.filter(design_id__in=ids)]
        critical = list(critical_path_of_runs(runs, number_of, scale, tokens_per_second).values())
        longest = max(critical)
        chunks = sum(run.tokens_out for run in runs)
        return {
            "designs": count,
            "succeeded": statuses.count(Design.Status.SUCCEEDED),
            "scale": scale,
            "tokens_per_second": tokens_per_second,
            "answers": "brief" if brief else "full",
            "simulator": "in-process" if inline else "child process",
            "pools": {
                name: {
                    "size": data.total,
                    "max_overflow": data.max_overflow,
                    "overflow_limit": data.overflow_limit,
                    "requests": data.requests_num,
                    "overflow_requests": data.requests_overflow,
                    "queued_requests": data.requests_queued,
                    "errors": data.requests_errors,
                }
                for name, data in stats.pools.items()
            },
            "database": {
                "vendor": connection.vendor,
                "name": str(connection.settings_dict["NAME"]),
                "owner": BENCHMARK_USERNAME,
                "design_ids": [min(ids), max(ids)],
            },
            "stages": stage_rows(runs, scale),
            "wall_time_s": round(wall, 3),
            "critical_path_s": round(longest, 3),
            "critical_path_mean_s": round(statistics.fmean(critical), 3),
            "ratio": round(wall / longest, 3),
            "target_ratio": TARGET_RATIO,
            "met": wall / longest <= TARGET_RATIO,
            "cpu_time_s": round(cpu, 3),
            "chunks_streamed": chunks,
            "cpu_us_per_chunk": round(cpu / chunks * 1e6, 1) if chunks else None,
            "simulator_peak_in_flight": peak,
        }

    async def _run(self, owner: Any, count: int) -> tuple[list[Design], float, float, dict]:
        """Warm the pools, start every design at once, wait for all; close the pools."""
        pool = get_pool()
        await pool.initialize()
        try:
            designs = [
                await create_design(owner, f"Benchmark design {n}: {REQUESTS[n % len(REQUESTS)]}")
                for n in range(1, count + 1)
            ]
            cpu_started = time.process_time()
            started = time.perf_counter()
            await asyncio.gather(*(start_design(design.pk) for design in designs))
            wall = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
            return designs, wall, cpu, pool.stats()
        finally:
            await pool.close()


def stage_rows(runs: list[AgentRun], scale: float) -> list[dict[str, Any]]:
    """Per stage: planned range, measured durations, waits for a slot, overflow calls."""
    rows = []
    for stage in STAGE_ORDER:
        agents = {spec.key: spec.emulated_seconds for spec in specs_in_stage(stage)}
        low = min(seconds[0] for seconds in agents.values())
        high = max(seconds[1] for seconds in agents.values())
        members = [run for run in runs if run.agent in agents]
        durations = [run.duration_ms / 1000 for run in members if run.duration_ms is not None]
        waits = [run.wait_ms for run in members if run.wait_ms is not None]
        rows.append(
            {
                "stage": REPORTED_STAGE_NAMES.get(stage, str(stage)),
                "agents": len(agents),
                "planned_s": [round(low * scale, 3), round(high * scale, 3)],
                "measured_mean_s": round(statistics.fmean(durations), 3) if durations else None,
                "measured_max_s": round(max(durations), 3) if durations else None,
                "wait_p50_ms": round(percentile(waits, 50) or 0.0, 1),
                "wait_max_ms": round(max(waits), 1) if waits else None,
                "overflow_calls": sum(1 for run in members if run.overflow),
                "calls": len(members),
            }
        )
    return rows


def render_report(report: dict[str, Any]) -> str:
    pools = ", ".join(
        f"{name} {data['size']}"
        + (f" (+{data['overflow_requests']} overflow, {data['queued_requests']} queued)")
        for name, data in report["pools"].items()
    )
    database = report["database"]
    lines = [
        "Carlos pipeline benchmark",
        f"  designs            {report['designs']} concurrent, "
        f"{report['succeeded']}/{report['designs']} succeeded",
        f"  scale              {report['scale']:g} x the original's stage latencies",
        f"  simulator          {report['simulator']}, {report['answers']} answers, "
        f"{report['tokens_per_second']:g} tokens/s per stream, "
        f"peak {report['simulator_peak_in_flight']} requests in flight",
        f"  pools              {pools}",
        f"  database           {database['vendor']} {database['name']}: designs "
        f"#{database['design_ids'][0]}-#{database['design_ids'][1]} owned by "
        f"'{database['owner']}'",
        "",
        f"  {'stage':<13}{'planned (s)':>14}{'mean (s)':>10}{'max (s)':>10}"
        f"{'wait p50':>10}{'wait max':>10}{'overflow':>10}",
    ]
    for row in report["stages"]:
        low, high = row["planned_s"]
        name = row["stage"] + (f" x{row['agents']}" if row["agents"] > 1 else "")
        lines.append(
            f"  {name:<13}{f'{low:.2f}-{high:.2f}':>14}{_num(row['measured_mean_s'], 2):>10}"
            f"{_num(row['measured_max_s'], 2):>10}{_num(row['wait_p50_ms'], 0) + ' ms':>10}"
            f"{_num(row['wait_max_ms'], 0) + ' ms':>10}"
            f"{str(row['overflow_calls']) + '/' + str(row['calls']):>10}"
        )
    verdict = "MET" if report["met"] else "NOT MET"
    lines += [
        "",
        f"  wall time          {report['wall_time_s']:.2f} s",
        f"  critical path      {report['critical_path_s']:.2f} s (longest design: requirements "
        "+ max(designs) + max(analysts) + auditor + recommender + terraform)",
        f"  ratio              {report['ratio']:.3f} (target <= {report['target_ratio']}: "
        f"{verdict})",
        f"  CPU time           {report['cpu_time_s']:.2f} s for {report['chunks_streamed']:,} "
        f"streamed chunks ({report['cpu_us_per_chunk']} us per chunk, simulator included)",
    ]
    exported = report.get("telemetry") or {}
    if exported.get("enabled"):
        spans = {
            name: counts
            for name, counts in (exported.get("spans") or {}).items()
            if isinstance(counts, dict)
        }
        lines.append(
            "  telemetry          on: traces to "
            + ", ".join(
                f"{name} ({counts['exported']} spans exported, {counts['dropped']} dropped)"
                for name, counts in spans.items()
            )
        )
    else:
        lines.append("  telemetry          off")
    return "\n".join(lines)


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
