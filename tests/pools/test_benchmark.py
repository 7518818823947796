"""`manage.py benchmark_pools`: it runs and reports every table; its figures are never asserted.

Quick settings (a few rounds, short streams) against real simulators in child processes: the
test proves the rows are measured and printed, not how fast anything is.
"""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import CommandError, call_command

from pools.benchmark import STREAM_VARIANTS, long_answer
from pools.management.commands.benchmark_pools import _format_all
from pools.simulator.responders import ChatRequest, tokenize

STREAM_TOKENS = 60


def test_the_benchmark_reports_the_zero_delay_call_and_the_cpu_per_chunk() -> None:
    out = io.StringIO()
    call_command(
        "benchmark_pools",
        "--rounds=5",
        "--stream-rounds=1",
        f"--stream-tokens={STREAM_TOKENS}",
        "--json",
        stdout=out,
    )
    summary = json.loads(out.getvalue())

    assert set(summary["variants"]) == {"pooled", "fresh", "reused", "original"}
    zero_delay = summary["zero_delay"]
    assert zero_delay["rounds"] == 5
    assert set(zero_delay["transports"]) == {"TLS", "HTTP"}
    for row in zero_delay["transports"].values():
        assert row["pooled_ms"] > 0 and row["sdk_ms"] > 0
        assert row["pooled_vs_sdk"] == pytest.approx(row["pooled_ms"] / row["sdk_ms"], abs=0.002)
        assert row["extra_us"] == pytest.approx((row["pooled_ms"] - row["sdk_ms"]) * 1000, abs=1)
    observers = zero_delay["observers"]
    assert set(observers) == {"prometheus_us", "interval_recorder_us"}
    streaming = summary["streaming"]["variants"]
    assert set(streaming) == set(STREAM_VARIANTS)
    # Every variant read the whole stream: one chunk per token of text (bare httpx also
    # counts the role and finish events, which carry none).
    assert streaming["pooled"]["chunks_per_stream"] == STREAM_TOKENS
    assert streaming["sdk"]["chunks_per_stream"] == STREAM_TOKENS
    assert STREAM_TOKENS <= streaming["httpx_lines"]["chunks_per_stream"] <= STREAM_TOKENS + 2
    assert all(row["cpu_us_per_chunk"] > 0 for row in streaming.values())

    text = _format_all(summary)  # what the command prints without --json
    assert "Zero emulated delay, one non-streamed call, 5 interleaved rounds" in text
    assert any(line.startswith("TLS ") for line in text.splitlines())
    assert any(line.startswith("HTTP ") for line in text.splitlines())
    assert "µs for the Prometheus metrics" in text
    for label in STREAM_VARIANTS.values():
        assert any(line.startswith(label) for line in text.splitlines()), label


def test_the_benchmark_refuses_settings_that_measure_nothing() -> None:
    with pytest.raises(CommandError, match="--stream-tokens"):
        call_command("benchmark_pools", "--stream-tokens=3")
    with pytest.raises(CommandError, match="--rounds"):
        call_command("benchmark_pools", "--rounds=2")


def test_the_long_answer_has_one_token_per_requested_token() -> None:
    request = ChatRequest(
        model="gpt-4o",
        messages=[{"role": "user", "content": "hello"}],
        temperature=None,
        max_tokens=250,
        stream=True,
        include_usage=False,
        response_format=None,
        deployment=None,
        body={},
    )
    assert len(tokenize(long_answer(request))) == 250
