"""One design's telemetry end to end: whole designs in child processes (`manage.py design`,
`manage.py serve`), as in production, exporting to the loopback receivers of
`telemetry_receivers`; the SDK's global providers can be installed once a process, so this
process never installs them. Also the lifespan's and the ASGI application's telemetry hooks.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.conf import settings

from carlos.lifespan import PoolLifespan
from pools.simulator.process import start_simulator
from tests.carlos.telemetry_receivers import (
    AZURE_QUIET,
    INSTRUMENTATION_KEY,
    MASKED_KEY,
    OTEL_VARIABLES,
    attributes_of,
    connection_string,
    metric_names,
    spans_in,
)
from tests.servers import child_env, manage, serving, stop

# -- one design, end to end, in child processes ---------------------------------------------------
REQUEST = "A booking site for 20 clinics"
STAGES = {"requirements", "designs", "analyses", "audit", "recommendation", "terraform"}


@pytest.fixture(scope="module")
def migrated(tmp_path_factory) -> str:
    """A migrated SQLite database for this module's child processes (its URL)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('telemetry') / 'db.sqlite3'}"
    manage(child_env(url), "migrate", "--verbosity", "0")
    return url


@pytest.fixture
def llm_simulator() -> Iterator[Any]:
    """`manage.py llm_simulator` in a child, keeping a log of the requests it received."""
    simulator = start_simulator(
        ["--port", "0", "--request-log", "500"], manage_py=settings.BASE_DIR / "manage.py"
    )
    try:
        yield simulator
    finally:
        simulator.stop()


def design_env(database: str, **extra: str) -> dict[str, str]:
    env = child_env(database, **AZURE_QUIET, **extra)
    for name in OTEL_VARIABLES:
        if name not in extra:
            env.pop(name, None)
    return env


def simulator_requests(simulator: Any) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{simulator.root_url}/_simulator/requests", timeout=10) as reply:
        body = json.loads(reply.read())
    assert body["enabled"] and body["dropped"] == 0
    return body["requests"]


def test_one_design_is_one_trace_at_the_collector_and_in_application_insights(
    migrated, llm_simulator, receiver, tmp_path
):
    """`manage.py design` against a simulator child, exporting over OTLP and to Azure
    Monitor at once: the span tree, the GenAI attributes, the tokens the simulator reported
    (as the AgentRun rows store them), the traceparent the simulator received, the metrics,
    the trace id on the log lines; the instrumentation key nowhere in the output, at DEBUG."""
    env = design_env(
        migrated,
        LLM_SIMULATOR_URL=llm_simulator.base_url,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
        APPLICATIONINSIGHTS_CONNECTION_STRING=connection_string(receiver.port),
        OTEL_SERVICE_NAME="carlos-e2e",
        LOG_LEVEL="DEBUG",
        TMPDIR=str(tmp_path),
    )
    done = manage(env, "design", REQUEST, "--no-simulator", "--json")
    document = json.loads(done.stdout)
    assert document["design"]["status"] == "succeeded"
    runs = document["runs"]

    spans = spans_in(receiver.traces())
    roots = [span for span in spans if span.name == "design"]
    assert len(roots) == 1, [span.name for span in spans]
    root = roots[0]
    assert root.parent_id == ""
    assert root.attributes["carlos.design.id"] == document["design"]["id"]
    assert root.attributes["carlos.design.status"] == "succeeded"
    assert {span.trace_id for span in spans} == {root.trace_id}  # one design, one trace
    assert root.resource["service.name"] == "carlos-e2e"
    by_id = {span.span_id: span for span in spans}

    stages = [span for span in spans if span.name.startswith("stage ")]
    assert {span.attributes["carlos.stage"] for span in stages} == STAGES
    assert all(span.parent_id == root.span_id for span in stages)
    agents = [span for span in spans if span.name.startswith("invoke_agent ")]
    assert all(by_id[span.parent_id] in stages for span in agents)
    assert sorted(span.attributes["gen_ai.agent.name"] for span in agents) == sorted(
        run["agent"] for run in runs
    )
    chats = [span for span in spans if span.name.startswith("chat ")]
    assert len(chats) == len(runs)
    for chat in chats:
        agent = by_id[chat.parent_id]
        assert agent in agents
        run = next(
            run
            for run in runs
            if run["agent"] == agent.attributes["gen_ai.agent.name"]
            and run["round"] == agent.attributes["carlos.round"]
        )
        attributes = chat.attributes
        assert chat.kind == 3  # CLIENT
        assert chat.name == f"chat {run['model']}"
        assert attributes["gen_ai.operation.name"] == "chat"
        assert attributes["gen_ai.provider.name"] == "openai"
        assert attributes["gen_ai.request.model"] == run["model"]
        assert attributes["gen_ai.response.model"]
        assert attributes["gen_ai.response.id"]
        assert attributes["gen_ai.response.finish_reasons"] == ["stop"]
        assert attributes["gen_ai.request.temperature"] == pytest.approx(run["temperature"])
        assert attributes["server.address"] == "127.0.0.1"
        assert attributes["server.port"] == urlsplit(llm_simulator.base_url).port
        assert attributes["carlos.pool.name"] == run["pool"]
        # The simulator's usage, as the AgentRun row stores it.
        assert attributes["gen_ai.usage.input_tokens"] == run["tokens_in"] > 0
        assert attributes["gen_ai.usage.output_tokens"] == run["tokens_out"] > 0

    # Every request the simulator received carried the traceparent of its chat span.
    received = simulator_requests(llm_simulator)
    assert len(received) == len(chats)
    sent = [entry["traceparent"].split("-") for entry in received]
    assert sorted((version, trace_id, span_id) for version, trace_id, span_id, _ in sent) == sorted(
        ("00", chat.trace_id, chat.span_id) for chat in chats
    )
    assert all(int(flags, 16) & 1 for *_, flags in sent)  # sampled

    # Metrics: the GenAI client metrics and the pools' own, the tokens adding up.
    metrics = receiver.metrics()
    names = metric_names(metrics)
    assert {"gen_ai.client.operation.duration", "gen_ai.client.token.usage"} <= names
    assert any(name.startswith("carlos.pool.") for name in names), names
    output_tokens = 0
    for request in metrics[-1:]:  # cumulative: the last export holds the totals
        for resource_metrics in request.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.name == "gen_ai.client.token.usage":
                        for point in metric.histogram.data_points:
                            kind = attributes_of(point.attributes)["gen_ai.token.type"]
                            output_tokens += point.sum if kind == "output" else 0
    assert output_tokens == sum(run["tokens_out"] for run in runs)

    # The same trace in Application Insights: a dependency per call, with its GenAI facts.
    dependencies = [
        envelope
        for envelope in receiver.envelopes()
        if envelope["data"]["baseType"] == "RemoteDependencyData"
        and envelope["data"]["baseData"]["name"].startswith("chat ")
    ]
    assert len(dependencies) == len(chats)
    assert {envelope["tags"]["ai.operation.id"] for envelope in dependencies} == {root.trace_id}
    assert sorted(
        int(envelope["data"]["baseData"]["properties"]["gen_ai.usage.output_tokens"])
        for envelope in dependencies
    ) == sorted(run["tokens_out"] for run in runs)

    # The design's log lines carry its trace id; the key appears nowhere.
    output = done.stdout + done.stderr
    assert f"[trace={root.trace_id} span=" in output
    assert INSTRUMENTATION_KEY not in output


def test_a_collector_that_never_answers_does_not_slow_a_design(migrated, silent, tmp_path):
    """Every export hangs (30 s timeout) while the design runs: the design still takes its
    usual second or two, and the command exits soon after (the shutdown's bound)."""
    env = design_env(
        migrated,
        OTEL_EXPORTER_OTLP_ENDPOINT=silent.url,
        OTEL_EXPORTER_OTLP_TIMEOUT="30",
        OTEL_BSP_SCHEDULE_DELAY="20",  # exports start (and hang) while the design runs
        OTEL_METRIC_EXPORT_INTERVAL="200",
        TMPDIR=str(tmp_path),
    )
    started = time.time()
    done = manage(env, "design", REQUEST, "--fast", "--json")
    elapsed = time.time() - started
    design = json.loads(done.stdout)["design"]
    assert design["status"] == "succeeded"
    began = datetime.fromisoformat(design["started_at"]).timestamp()
    finished = datetime.fromisoformat(design["finished_at"]).timestamp()
    assert silent.accepted_at and silent.accepted_at[0] < finished  # hung during the design
    assert finished - began < 15  # about 1 s; a design that waited on export would take 30+
    assert elapsed < 30 + 5  # the exporter's timeout is 30 s: shutdown did not wait for it
    assert "did not finish within" in done.stderr


def test_serve_sets_telemetry_up_shows_it_to_operators_and_flushes_at_shutdown(receiver, tmp_path):
    """`manage.py serve` with both destinations: /health's operator view and `pool_status`
    say where traces and metrics go (the key masked); the metrics, exported every minute,
    reach the receivers at shutdown (the flush after the drain); the key is in no output."""
    env = design_env(
        f"sqlite:///{tmp_path / 'db.sqlite3'}",
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
        APPLICATIONINSIGHTS_CONNECTION_STRING=connection_string(receiver.port),
        TMPDIR=str(tmp_path),
    )
    log = tmp_path / "serve.log"
    with serving(env, log, "--migrate") as server:
        with urllib.request.urlopen(f"{server.base}/health", timeout=10) as reply:
            health = reply.read().decode()
        section = json.loads(health)["telemetry"]
        assert section["enabled"] is True
        assert section["traces"]["otlp"] == f"{receiver.url}/v1/traces"
        assert section["metrics"]["azure_monitor"] == f"{receiver.url}/v2.1/track"
        assert section["azure_monitor"]["instrumentation_key"] == MASKED_KEY
        assert section["service_instance_id"].endswith(f":{server.process.pid}")
        status = manage(env, "pool_status", "--url", server.base)
        assert "; telemetry on" in status.stdout.splitlines()[0]
        assert f"traces: OTLP {receiver.url}/v1/traces, Azure Monitor" in status.stdout
        assert f"instrumentation key {MASKED_KEY}" in status.stdout
        assert not receiver.metrics()  # every 60 s: none yet
        stop(server.process)
        assert server.process.returncode == 0, server.tail()
    names = metric_names(receiver.metrics())
    assert any(name.startswith("carlos.pool.") for name in names), names
    assert any(envelope["data"]["baseType"] == "MetricData" for envelope in receiver.envelopes())
    output = log.read_text() + health + status.stdout + status.stderr
    assert "📡 Telemetry on" in output
    assert INSTRUMENTATION_KEY not in output


async def test_the_lifespan_sets_up_before_warm_up_and_flushes_after_the_pools_close(
    installed_registry,
):
    """What uvicorn drives: `on_starting` first, `on_stopped` once the pools are closed (as
    carlos.asgi passes carlos.lifecycle.starting and .stopped)."""
    calls: list[tuple[str, bool, bool]] = []

    def starting() -> None:
        calls.append(("starting", installed_registry.usable, installed_registry.closed))

    async def stopped() -> None:
        calls.append(("stopped", installed_registry.usable, installed_registry.closed))

    app = PoolLifespan(lambda *args: None, on_starting=starting, on_stopped=stopped)
    inbox: asyncio.Queue = asyncio.Queue()
    for message in ({"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}):
        await inbox.put(message)
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    thresholds = gc.get_threshold()
    try:
        await asyncio.wait_for(app({"type": "lifespan"}, inbox.get, send), 10)
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert calls == [("starting", False, False), ("stopped", False, True)]


def test_the_asgi_application_passes_the_telemetry_hooks():
    from carlos import lifecycle
    from carlos.asgi import application

    assert application.on_starting is lifecycle.starting
    assert application.on_stopped is lifecycle.stopped
