"""The load test's figures: latencies summarised, failures grouped by cause, the probe's
readings, the report as JSON and as the table an operator reads, and the targets."""

from __future__ import annotations

import contextlib
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from carlos.loadtest.options import (
    HEALTH_P99_TARGET_MS,
    TERMINAL_STATUSES,
    UNFINISHED_STATUSES,
    LoadTestOptions,
)
from carlos.loadtest.readings import Mark, cpu_between
from pools.engine.intervals import percentile

if TYPE_CHECKING:
    from carlos.loadtest.users import Recorder

# Cause of a failed design, from its error text (agents.pipeline.describe_error), first match.
CAUSES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("circuit open", re.compile(r"CircuitOpen")),
    ("pool refused", re.compile(r"PoolTimeout|PoolExhausted|PoolClosed")),
    ("deadline", re.compile(r"DeadlineExceeded|APITimeoutError|timed out", re.IGNORECASE)),
    ("upstream 5xx after retries", re.compile(r"\(HTTP 5\d\d\)|InternalServerError")),
    ("rate limited", re.compile(r"\(HTTP 429\)|RateLimitError|RateBudgetExceeded")),
    (
        "connection reset",
        re.compile(
            r"APIConnectionError|RemoteProtocolError|ReadError|Connection reset|"
            r"peer closed|incomplete chunked",
            re.IGNORECASE,
        ),
    ),
    ("bad model output", re.compile(r"OutputFormatError|ValidationError|JSON")),
    ("interrupted", re.compile(r"^interrupted", re.IGNORECASE)),
)


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Count, p50, p99 and max of latencies in milliseconds, rounded for reading."""

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 1)

    return {
        "count": len(values),
        "p50_ms": rounded(percentile(list(values), 50)),
        "p99_ms": rounded(percentile(list(values), 99)),
        "max_ms": rounded(max(values) if values else None),
    }


def failure_cause(error: str) -> str:
    """A design's error text grouped into one of a few causes an operator can act on."""
    for cause, pattern in CAUSES:
        if pattern.search(error):
            return cause
    first_line = error.strip().splitlines()[0] if error.strip() else "no error text"
    return f"other: {first_line[:60]}"


@dataclass
class ProbeReadings:
    """What the probe wrote, read back after it stopped."""

    health: list[tuple[float, float, int]] = field(default_factory=list)  # start, ms, status
    visits: list[tuple[float, float, int]] = field(default_factory=list)  # the login page
    # at, server sockets (less the probe's own in-flight connections), RSS in kB
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    # Probes sent while their server was restarting (draining, then down): what a deploy
    # costs a client that does not fail over, kept out of the figures the target is about.
    restarting: list[tuple[float, float, int]] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path, out_of_service: Sequence[tuple[float, float]] = ()) -> ProbeReadings:
        """One probe's file; `out_of_service`: its server's restarts (monotonic from, to)."""
        readings = cls()
        with contextlib.suppress(OSError), path.open() as lines:
            for line in lines:
                parts = line.split()
                with contextlib.suppress(ValueError, IndexError):
                    if parts[0] == "H":
                        probe = (float(parts[1]), float(parts[2]), int(parts[3]))
                        restarting = any(a <= probe[0] < b for a, b in out_of_service)
                        (readings.restarting if restarting else readings.health).append(probe)
                    elif parts[0] == "V":
                        readings.visits.append((float(parts[1]), float(parts[2]), int(parts[3])))
                    elif parts[0] == "S":
                        own = int(parts[4]) if len(parts) > 4 else 0
                        readings.samples.append(
                            (float(parts[1]), int(parts[2]) - max(own - 1, 0), int(parts[3]))
                        )
        return readings

    @classmethod
    def combined(cls, parts: Iterable[ProbeReadings]) -> ProbeReadings:
        """Several servers' readings as one (a peak is then the peak of any one server)."""
        readings = cls()
        for part in parts:
            readings.health += part.health
            readings.visits += part.visits
            readings.samples += part.samples
            readings.restarting += part.restarting
        return readings

    def health_between(self, start: float, end: float) -> dict[str, Any]:
        return answers_summary(
            [(ms, status) for at, ms, status in self.health if start <= at < end]
        )

    def visits_between(self, start: float, end: float) -> dict[str, Any]:
        return answers_summary(
            [(ms, status) for at, ms, status in self.visits if start <= at < end]
        )

    def during_restarts(self) -> dict[str, Any]:
        return answers_summary([(ms, status) for _, ms, status in self.restarting])


def answers_summary(
    answers: Sequence[tuple[float, int]], failed_key: str = "non_200"
) -> dict[str, Any]:
    """`summarize` of timed answers (ms, status), with the count of those other than 200."""
    return {
        **summarize([ms for ms, _ in answers]),
        failed_key: sum(1 for _, status in answers if status != 200),
    }


# --- the report -----------------------------------------------------------------------------


def build_report(
    *,
    options: LoadTestOptions,
    recorder: Recorder,
    readings: ProbeReadings,
    marks: dict[str, Mark],
    health_at_start: dict[str, Any],
    at_rest: dict[str, Any],
    database: dict[str, Any],
    sockets: dict[str, tuple[int | None, int | None]],
    memory: dict[str, int],
    timed_out: bool,
    rolling: dict[str, Any] | None = None,
    redis_prefix: str | None = None,
) -> dict[str, Any]:
    """The figures as one JSON-ready document (the table is drawn from it). `rolling`: the
    rolling restart's figures, which add its targets; `redis_prefix`: the keys of the run's
    own, when its workers shared a Redis (deleted once the run has stopped)."""
    runs = recorder.designs
    causes: Counter[str] = Counter()
    not_terminal: Counter[str] = Counter()  # where the unfinished ones were stuck
    client_errors: list[str] = []
    succeeded = terminal = 0
    for run in runs:
        if run.status in TERMINAL_STATUSES:
            terminal += 1
            if run.status == "succeeded":
                succeeded += 1
            else:
                causes[failure_cause(run.error)] += 1
        elif run.client_failure is not None:
            causes[f"client error while {run.stage}"] += 1
            client_errors.append(f"design {run.number}, {run.stage}: {run.client_failure}")
        else:
            causes["not terminal"] += 1
            not_terminal[run.stage] += 1
            if run.socket_error:
                client_errors.append(f"design {run.number}, last socket error: {run.socket_error}")
    submitted = sum(1 for run in runs if run.design_id is not None)
    by_status = Counter(status for _, status, _ in database["designs"])
    unfinished = {s: by_status[s] for s in UNFINISHED_STATUSES if by_status.get(s)}

    health = at_rest["health"]
    simulator = at_rest["simulator"]
    leak_details = list(at_rest["problems"])
    if unfinished:
        leak_details.append(f"designs left unfinished in the database: {unfinished}")
    if database.get("error"):
        leak_details.append(f"could not read the database to check it: {database['error']}")
    if database["runs_running"]:
        leak_details.append(f"{database['runs_running']} agent runs still marked running")
    upstream_open = health.get("http", {}).get("connections_open") or 0
    clients_before, clients_after = sockets["before"][1], sockets["after"][1]
    if clients_before is not None and clients_after is not None and clients_after > clients_before:
        leak_details.append(
            f"{clients_after - clients_before} more sockets (not upstream, not Redis) open in "
            "the server than before the run (unclosed client or WebSocket connections)"
        )

    phases = {
        "setup_s": marks["ready"].at - marks["start"].at,
        "logins_s": marks["logins"].at - marks["ready"].at,
        "designs_s": marks["designs"].at - marks["logins"].at,
        "checks_s": marks["checks"].at - marks["designs"].at,
    }
    health_designs = readings.health_between(marks["logins"].at, marks["designs"].at)
    durations = [
        (run.finished_at - run.submitted_at) * 1000
        for run in runs
        if run.finished_at is not None and run.submitted_at is not None
    ]
    peak_sockets = max((s for _, s, _ in readings.samples), default=None)
    peak_rss_kb = max([rss for _, _, rss in readings.samples] + [memory.get("VmHWM", 0)], default=0)
    counters = {
        name: {key: value for key, value in pool.items() if key.startswith("requests_")}
        for name, pool in health.get("pools", {}).items()
    }
    designs_s = max(marks["designs"].at - marks["logins"].at, 1e-9)
    health_p99 = health_designs["p99_ms"]
    all_terminal = submitted == options.designs and terminal == options.designs
    targets = {
        "every_design_terminal": {
            "measured": f"{terminal}/{options.designs}",
            "met": all_terminal and not timed_out,
        },
        **rolling_targets(options, rolling, succeeded),
        "zero_leaks": {
            "measured": "none" if not leak_details else f"{len(leak_details)} found",
            "met": not leak_details,
        },
        "health_p99_under_100ms": {
            "measured": health_p99,
            "met": health_p99 is not None
            and health_p99 < HEALTH_P99_TARGET_MS
            and health_designs["non_200"] == 0,
        },
    }
    return {
        "setup": {
            "host": options.host,
            "designs": options.designs,
            "users": options.user_count,
            "timeout_s": options.timeout,
            "fault_rate": round(sum(options.rates.values()), 6),
            **{key: round(value, 6) for key, value in options.rates.items()},
            "stall_seconds": options.stall_seconds,
            "ttft_ms": options.ttft_ms,
            "tokens_per_second": options.tokens_per_second,
            "simulator_nice": options.simulator_nice,
            "servers": len(options.server_labels),
            "workers": options.workers,
            **({"redis_prefix": redis_prefix} if redis_prefix else {}),
            "seed": options.seed,
            "login_concurrency": options.login_concurrency,
            "cpus": os.cpu_count(),
            "pools": {
                name: pool.get("total") for name, pool in health_at_start.get("pools", {}).items()
            },
            "http_max_connections": health_at_start.get("http", {}).get("max_connections"),
        },
        "designs": {
            "submitted": submitted,
            "terminal": terminal,
            "succeeded": succeeded,
            "failed": options.designs - succeeded,
            "not_terminal": options.designs - terminal,
            "failures_by_cause": dict(causes.most_common()),
            "not_terminal_stages": dict(not_terminal),
            "client_errors": client_errors[:20],
            "timed_out": timed_out,
            "socket_events": recorder.socket_events,
            "socket_reconnects": sum(run.reconnects for run in runs),
            "submits_refused_busy": sum(run.refusals for run in runs),
            "duration": summarize(durations),
            "logins_failed": recorder.logins_failed,
            "database_statuses": dict(by_status),
        },
        "latency": {page: summarize(values) for page, values in recorder.latencies.items()},
        "health": {
            "interval_s": options.probe_interval,
            "whole_run": readings.health_between(marks["ready"].at, marks["checks"].at),
            "during_logins": readings.health_between(marks["ready"].at, marks["logins"].at),
            "during_designs": health_designs,
            # A visitor's login page (carlos.loadtest.probe), while the designs run.
            "login_page_during_designs": readings.visits_between(
                marks["logins"].at, marks["designs"].at
            ),
        },
        "server": {
            "peak_sockets": peak_sockets,
            "sockets_before": sockets["before"][0],
            "sockets_after": sockets["after"][0],
            "peak_rss_mb": round(peak_rss_kb / 1024, 1),
            "rss_after_mb": round(memory.get("VmRSS", 0) / 1024, 1),
            "cpu_cores_during_logins": cpu_between(marks["ready"], marks["logins"]),
            "cpu_cores_during_designs": cpu_between(marks["logins"], marks["designs"]),
        },
        "upstream": {
            "pool_counters": counters,
            "tokens_out": database["tokens_out"],
            "tokens_per_second_during_designs": round(database["tokens_out"] / designs_s),
            "connections_open_after": upstream_open,
            "connections_opened": health.get("http", {}).get("connections_num"),
            "simulator": {
                key: simulator.get(key)
                for key in (
                    "chat_requests",
                    "status_counts",
                    "resets",
                    "stalls",
                    "peak_in_flight",
                    "connections_accepted",
                    "connections_open",
                )
            },
        },
        **({"rolling_restart": rolling} if rolling is not None else {}),
        "leaks": {"found": bool(leak_details), "details": leak_details},
        "wall_time_s": round(marks["checks"].at - marks["start"].at, 1),
        "phases": {key: round(value, 1) for key, value in phases.items()},
        "targets": targets,
        "met": all(target["met"] for target in targets.values()),
    }


def rolling_targets(
    options: LoadTestOptions, rolling: dict[str, Any] | None, succeeded: int
) -> dict[str, dict[str, Any]]:
    """A rolling restart's targets: every design succeeded (unless faults were injected,
    which fail some by design), no finished agent called again, every server back after a
    clean drain (exit 0)."""
    if rolling is None:
        return {}
    targets: dict[str, dict[str, Any]] = {}
    if sum(options.rates.values()) == 0:
        targets["every_design_succeeded"] = {
            "measured": f"{succeeded}/{options.designs}",
            "met": succeeded == options.designs,
        }
    calls = rolling["agent_calls"]
    complete = calls["log_enabled"] and calls["log_dropped"] == 0 and calls["calls"] > 0
    targets["no_completed_agent_repeated"] = {
        "measured": calls["after_answer_saved"] if complete else "log incomplete",
        "met": complete and calls["after_answer_saved"] == 0,
    }
    restarts = rolling["restarts"]
    targets["every_restart_clean"] = {
        "measured": ", ".join(f"{r['server']} {r['exit_code']}" for r in restarts) or "none",
        "met": len(restarts) == len(rolling["servers"])
        and all(r["exit_code"] == 0 for r in restarts),
    }
    return targets


def _workers(count: int) -> str:
    return "1 server process" if count == 1 else f"{count} server workers (serve --workers)"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def format_rolling(rolling: dict[str, Any], designs: dict[str, Any]) -> list[str]:
    """The rolling restart's lines of the table."""
    settings = ", ".join(f"{k} {v}" for k, v in rolling["settings"].items())
    failed = designs["terminal"] - designs["succeeded"]
    lines = [
        f"restarts   servers {' and '.join(rolling['servers'])} on one database ({settings}): "
        f"{designs['succeeded']} succeeded, {failed} failed, {designs['not_terminal']} not "
        f"terminal; {rolling['designs_resumed']} resumed (started more than once)",
    ]
    for restart in rolling["restarts"]:
        handed = ""
        if restart["designs_at_checkpoint"] is not None:
            handed = (
                f"; {restart['designs_at_checkpoint']} designs handed on at a checkpoint, "
                f"{restart['designs_stopped_mid_agent']} stopped mid-agent"
            )
        lines.append(
            f"  server {restart['server']}: SIGTERM to exit {restart['drain_s']} s (exit "
            f"{restart['exit_code']}{handed}), down {restart['down_s']} s until /health 200"
        )
    calls = rolling["agent_calls"]
    lines.append(
        f"  agent calls {calls['calls']}: {calls['after_answer_saved']} for an agent after its "
        f"answer was saved, {calls['again_after_stopped_mid_answer']} made again for agents "
        f"stopped mid-answer ({rolling['agent_runs_stopped']} agent runs stopped by the drains; "
        "those still waiting for a pool slot had made no call)"
        + (f"; request log dropped {calls['log_dropped']}" if calls["log_dropped"] else "")
    )
    during = rolling["health_while_restarting"]
    lines.append(
        f"  {rolling['submits_refused_while_draining']} submits refused (503) by a draining "
        f"server, {rolling['requests_failed_over']} requests sent to the other server; "
        f"/health of a restarting server: {during['count']} probes, {during['non_200']} "
        "not 200 (left out of the /health figures below)"
    )
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The report as the table an operator reads."""
    setup, designs, server = report["setup"], report["designs"], report["server"]
    rolling = report.get("rolling_restart")
    lines = [
        f"Carlos load test on {setup['host']}: {setup['designs']} designs by {setup['users']} "
        f"users, {setup['cpus']} CPUs, {_workers(setup.get('workers', 1))}"
        + (", two servers restarted in turn (--rolling-restart)" if rolling else ""),
        f"faults {setup['fault_rate']:.1%} (HTTP 500 {setup['error_rate']:.2%}, reset "
        f"{setup['reset_rate']:.2%}, stall {setup['stall_rate']:.2%} for "
        f"{setup['stall_seconds']:g} s); simulator TTFT {setup['ttft_ms']:g} ms, "
        f"{setup['tokens_per_second']:g} tokens/s, nice {setup.get('simulator_nice', 0)}; pools "
        + ", ".join(f"{k} {v}" for k, v in setup["pools"].items()),
        "",
        f"designs    submitted {designs['submitted']}, terminal {designs['terminal']}, "
        f"succeeded {designs['succeeded']}, failed {designs['failed']}"
        + (" (timed out)" if designs["timed_out"] else ""),
    ]
    for cause, count in designs["failures_by_cause"].items():
        lines.append(f"  {cause:<32} {count:>5}")
    duration = designs["duration"]
    lines.append(
        f"  submit to terminal: p50 {_ms(duration['p50_ms'])} ms, "
        f"p99 {_ms(duration['p99_ms'])} ms; {designs['socket_events']:,} socket events, "
        f"{designs['socket_reconnects']} reconnects, "
        f"{designs.get('submits_refused_busy', 0)} submits refused busy (503) and sent again"
    )
    if rolling:
        lines += ["", *format_rolling(rolling, designs)]
    lines += ["", f"{'latency':<28} {'count':>6} {'p50 ms':>10} {'p99 ms':>10} {'max ms':>10}"]
    rows = [(page.replace("_", " "), stats) for page, stats in report["latency"].items()]
    health = report["health"]
    rows += [
        ("/health during logins", health["during_logins"]),
        ("/health during designs", health["during_designs"]),
        ("/health whole run", health["whole_run"]),
    ]
    if "login_page_during_designs" in health:
        rows.append(("login page, designs phase", health["login_page_during_designs"]))
    for label, stats in rows:
        lines.append(
            f"  {label:<26} {stats['count']:>6} {_ms(stats['p50_ms']):>10} "
            f"{_ms(stats['p99_ms']):>10} {_ms(stats['max_ms']):>10}"
        )
    lines.append(f"  /health non-200 answers: {health['whole_run']['non_200']}")
    cores = server["cpu_cores_during_designs"]
    if setup.get("servers", 1) > 1:
        sockets = (
            f"servers    peak sockets {server['peak_sockets']} in one (both: before "
            f"{server['sockets_before']}, after {server['sockets_after']}), peak RSS "
            f"{server['peak_rss_mb']} MB in one; cpu of restarted servers is not compared"
        )
    else:
        every = " (all its processes)" if setup.get("workers", 1) > 1 else ""
        sockets = (
            f"server     peak sockets {server['peak_sockets']} (before "
            f"{server['sockets_before']}, after {server['sockets_after']}), peak RSS "
            f"{server['peak_rss_mb']} MB{every}"
        )
    lines += [
        "",
        sockets,
        "cpu cores during designs: "
        + ", ".join(
            f"{k.replace('_', ' ')} {v if v is not None else '-'}" for k, v in cores.items()
        ),
    ]
    upstream = report["upstream"]
    simulator = upstream["simulator"]
    lines.append(
        f"upstream   {simulator['chat_requests']} chat requests, statuses "
        f"{simulator['status_counts']}, {simulator['resets']} resets, {simulator['stalls']} "
        f"stalls, peak in flight {simulator['peak_in_flight']}, "
        f"{upstream['connections_opened']} connections opened; {upstream['tokens_out']:,} "
        f"tokens streamed, {upstream['tokens_per_second_during_designs']:,}/s during designs"
    )
    leaks = report["leaks"]
    lines += ["", "leaks      " + ("none" if not leaks["found"] else "; ".join(leaks["details"]))]
    phases = report["phases"]
    lines.append(
        f"wall time  {report['wall_time_s']} s (setup {phases['setup_s']}, logins "
        f"{phases['logins_s']}, designs {phases['designs_s']}, checks {phases['checks_s']})"
    )
    lines += ["", "targets"]
    labels = {
        "every_design_terminal": "every design terminal",
        "every_design_succeeded": "every design succeeded",
        "no_completed_agent_repeated": "completed agents called again",
        "every_restart_clean": "restart exit codes all 0",
        "zero_leaks": "zero leaks",
        "health_p99_under_100ms": "/health p99 < 100 ms (designs)",
    }
    for key, target in report["targets"].items():
        measured = target["measured"]
        shown = f"{measured} ms" if isinstance(measured, float) else str(measured)
        lines.append(f"  {labels[key]:<32} {shown:>14}   {'met' if target['met'] else 'MISSED'}")
    return "\n".join(lines)
