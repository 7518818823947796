"""Back-pressure: per-key quotas, capacity, scripted 429s and how limits are advertised."""

import asyncio
import email.utils
import math
import re
import time
from typing import Any

import httpx
import openai
import pytest

from pools.simulator import (
    count_prompt_tokens,
)
from pools.simulator.config import QUOTA_DEFAULT_MAX_TOKENS
from tests.pools.simulator.helpers import (
    MESSAGES,
    azure,
    limit_headers,
    payload,
    sdk,
    wait_for,
)

# --- quotas, 429s and rate-limit headers ------------------------------------------------------


async def test_quota_rpm_is_per_key_and_model_with_the_exact_wait(simulator_factory: Any) -> None:
    window = 0.8
    sim = await simulator_factory(quota_rpm=3, quota_window_s=window)
    one = httpx.AsyncClient(base_url=sim.base_url, headers={"authorization": "Bearer key-one"})
    two = httpx.AsyncClient(base_url=sim.base_url, headers={"authorization": "Bearer key-two"})
    async with one, two:
        before_first = time.monotonic()
        first = await one.post("/chat/completions", json=payload())
        after_first = time.monotonic()
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "3"
        assert first.headers["x-ratelimit-remaining-requests"] == "2"
        reset = first.headers["x-ratelimit-reset-requests"]  # until the oldest entry leaves
        assert re.fullmatch(r"\d+ms", reset) and 0 < int(reset[:-2]) <= 800
        # Every API request counts: a models list (against each of the key's models) ...
        listed = await one.get("/models")
        assert listed.status_code == 200
        assert listed.headers["x-ratelimit-remaining-requests"] == "1"
        # ... and a model lookup.
        looked_up = await one.get("/models/gpt-4o")
        assert looked_up.headers["x-ratelimit-remaining-requests"] == "0"

        before_refused = time.monotonic()
        refused = await one.post("/chat/completions", json=payload())
        after_refused = time.monotonic()
        assert refused.status_code == 429
        retry_ms = int(refused.headers["retry-after-ms"])
        # The exact wait until the first request leaves the window; the server's clock
        # readings lie between ours.
        low = (before_first + window - after_refused) * 1000
        high = (after_first + window - before_refused) * 1000 + 1
        assert low <= retry_ms <= high
        assert refused.headers["retry-after"] == str(math.ceil(retry_ms / 1000))
        assert refused.headers["x-ratelimit-limit-requests"] == "3"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        error = refused.json()["error"]
        assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
        assert "on requests per min (RPM): Limit 3, Used 3, Requested 1" in error["message"]
        assert (await one.get("/models")).status_code == 429

        # Another key, and another model of the same key, have their own quotas.
        other_key = await two.post("/chat/completions", json=payload())
        assert other_key.status_code == 200
        assert other_key.headers["x-ratelimit-remaining-requests"] == "2"
        other_model = await one.post("/chat/completions", json=payload(model="gpt-4o-mini"))
        assert other_model.status_code == 200
        assert other_model.headers["x-ratelimit-remaining-requests"] == "1"  # the list counted

        await asyncio.sleep(retry_ms / 1000 + 0.02)
        assert (await one.post("/chat/completions", json=payload())).status_code == 200
    assert sim.stats.quota_rejections == 2
    assert sim.stats.rate_limited == 2
    assert sim.stats.status_counts == {200: 6, 429: 2}


async def test_quota_tpm_charges_prompt_and_max_tokens_on_arrival(simulator_factory: Any) -> None:
    prompt = count_prompt_tokens(MESSAGES)
    limit = 3 * prompt + 1200
    sim = await simulator_factory(quota_tpm=limit, quota_window_s=30)
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        small = await http.post("/chat/completions", json=payload(max_tokens=100))
        assert small.status_code == 200
        assert small.headers["x-ratelimit-limit-tokens"] == str(limit)
        assert small.headers["x-ratelimit-remaining-tokens"] == str(limit - prompt - 100)
        assert small.headers["x-ratelimit-limit-requests"] == "10000"  # no RPM quota set

        big = await http.post("/chat/completions", json=payload(max_tokens=limit - 50 - prompt))
        assert big.status_code == 429
        assert big.headers["x-ratelimit-remaining-tokens"] == "0"
        assert big.headers["x-ratelimit-remaining-requests"] != "0"
        assert 29_000 <= int(big.headers["retry-after-ms"]) <= 30_000  # until `small` leaves
        assert big.headers["retry-after"] == "30"
        error = big.json()["error"]
        assert error["type"] == "tokens" and error["code"] == "rate_limit_exceeded"
        assert (
            f"(TPM): Limit {limit}, Used {prompt + 100}, Requested {limit - 50}"
            in (error["message"])
        )

        # The refused request took nothing: a small one still fits ...
        again = await http.post("/chat/completions", json=payload(max_tokens=100))
        assert again.headers["x-ratelimit-remaining-tokens"] == str(limit - 2 * (prompt + 100))
        # ... and no max_tokens is charged at the default.
        unset = await http.post("/chat/completions", json=payload())
        assert unset.status_code == 200
        assert QUOTA_DEFAULT_MAX_TOKENS == 1000
        assert unset.headers["x-ratelimit-remaining-tokens"] == "0"

        never = await http.post("/chat/completions", json=payload(max_tokens=limit + 1))
        assert never.status_code == 429
        assert "Request too large" in never.json()["error"]["message"]
        assert never.headers["retry-after-ms"] == "30000"
    assert sim.stats.quota_rejections == 2


async def test_quota_429_is_azure_shaped_on_deployment_paths(simulator_factory: Any) -> None:
    sim = await simulator_factory(quota_rpm=1, quota_window_s=30)
    async with azure(sim) as client:
        await client.chat.completions.create(model="main", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="main", messages=MESSAGES)
        # Another deployment has its own quota.
        assert (await client.chat.completions.create(model="other", messages=MESSAGES)).choices
        sim.apply_faults({"quota_rpm": 0, "quota_tpm": 100})
        with pytest.raises(openai.RateLimitError) as tokens_info:
            await client.chat.completions.create(model="third", messages=MESSAGES)
    response = info.value.response
    assert response.headers["retry-after"] == "30"
    assert response.json() == {
        "error": {
            "code": "429",
            "message": "Requests to the ChatCompletions_Create Operation under Azure OpenAI API "
            "version 2024-10-21 have exceeded call rate limit of your current OpenAI S0 pricing "
            "tier. Please retry after 30 seconds. Please go here: "
            "https://aka.ms/oai/quotaincrease if you would like to further increase the "
            "default rate limit.",
        }
    }
    assert info.value.code == "429"
    assert "have exceeded token rate limit" in tokens_info.value.response.json()["error"]["message"]


@pytest.mark.parametrize("mode", ["real", "none", "negative"])
async def test_ratelimit_header_modes(simulator_factory: Any, mode: str) -> None:
    sim = await simulator_factory(
        quota_rpm=1, quota_tpm=5000, quota_window_s=30, ratelimit_headers=mode
    )
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        ok = await http.post("/chat/completions", json=payload())
        refused = await http.post("/chat/completions", json=payload())
    assert (ok.status_code, refused.status_code) == (200, 429)
    assert "retry-after" in refused.headers
    left = str(5000 - count_prompt_tokens(MESSAGES) - QUOTA_DEFAULT_MAX_TOKENS)
    if mode == "none":
        assert limit_headers(ok) == limit_headers(refused) == {}
        return
    for response in (ok, refused):
        headers = limit_headers(response)
        assert len(headers) == 6
        assert re.fullmatch(r"\d+(\.\d+)?m?s", headers["x-ratelimit-reset-requests"])
        numbers = [
            headers[f"x-ratelimit-{name}-{kind}"]
            for name in ("limit", "remaining")
            for kind in ("requests", "tokens")
        ]
        if mode == "negative":
            assert numbers == ["-1"] * 4
        else:
            assert numbers == ["1", "5000", "0", left]  # tokens not exhausted on the 429


RETRY_HEADERS = {
    "both": {"retry-after", "retry-after-ms"},
    "seconds": {"retry-after"},
    "ms": {"retry-after-ms"},
    "date": {"retry-after"},
    "none": set(),
}


@pytest.mark.parametrize("mode", list(RETRY_HEADERS))
async def test_retry_after_mode_applies_to_every_429(simulator_factory: Any, mode: str) -> None:
    sim = await simulator_factory(
        retry_after_mode=mode,
        retry_after_s=40,
        next_429=1,
        quota_rpm=2,
        quota_window_s=30,
        capacity=1,
        tokens_per_second=20,
    )
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        scripted = await http.post("/chat/completions", json=payload())
        async with http.stream("POST", "/chat/completions", json=payload(stream=True)) as held:
            await anext(held.aiter_bytes())  # in flight, and charged to the quota
            capacity = await http.post("/chat/completions", json=payload())
        await wait_for(lambda: sim.stats.in_flight == 0)
        sim.config.tokens_per_second = 0
        assert (await http.post("/chat/completions", json=payload())).status_code == 200
        quota = await http.post("/chat/completions", json=payload())
    for response in (scripted, capacity, quota):
        assert response.status_code == 429
        assert {k for k in response.headers if k.startswith("retry-after")} == RETRY_HEADERS[mode]
    assert sim.stats.rate_limited == 3 and sim.stats.quota_rejections == 1
    if mode == "date":
        when = email.utils.parsedate_to_datetime(scripted.headers["retry-after"])
        assert 35 <= when.timestamp() - time.time() <= 41
        assert (
            0
            < email.utils.parsedate_to_datetime(quota.headers["retry-after"]).timestamp()
            - (time.time())
            <= 31
        )
    if mode in ("both", "seconds"):
        assert scripted.headers["retry-after"] == capacity.headers["retry-after"] == "40"
        assert quota.headers["retry-after"] == "30"
    if mode in ("both", "ms"):
        assert scripted.headers["retry-after-ms"] == capacity.headers["retry-after-ms"] == "40000"
        assert 29_000 <= int(quota.headers["retry-after-ms"]) <= 30_000


async def test_next_429_and_faults_hit_only_the_fault_model(simulator_factory: Any) -> None:
    sim = await simulator_factory(
        next_429=2, retry_after_s=0, fault_model="gpt-4o-mini", error_rate=1.0
    )
    async with sdk(sim) as client:
        assert (await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)).choices
        assert sim.config.next_429 == 2  # the other model does not count down
        for left in (1, 0):
            with pytest.raises(openai.RateLimitError) as info:
                await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            assert sim.config.next_429 == left
            assert info.value.response.headers["retry-after"] == "0"
            assert info.value.response.headers["retry-after-ms"] == "0"
            assert info.value.code == "rate_limit_exceeded"
            assert "gpt-4o-mini" in info.value.message
        # Then the model's other faults: error_rate applies to it, and only to it.
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert (await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)).choices
    assert sim.stats.rate_limited == 2
    assert sim.stats.status_counts == {200: 2, 429: 2, 500: 1}


async def test_latency_rises_with_concurrency_and_capacity_changes_live(
    simulator_factory: Any,
) -> None:
    sim = await simulator_factory(capacity=2, ttft_per_request_ms=250, tokens_per_second=20)
    streams = []

    async def first_token_after() -> float:
        started = time.monotonic()
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True
        )
        streams.append(stream)
        await anext(aiter(stream))
        return time.monotonic() - started

    async with sdk(sim) as client:
        alone = await first_token_after()
        second = await first_token_after()  # one request already in flight
        assert second > alone
        assert second >= 0.24
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        sim.apply_faults({"capacity": 3})
        third = await first_token_after()  # two in flight: twice the extra wait
        assert third > second
        assert third >= 0.49
        assert sim.stats.peak_in_flight == 3
        for stream in streams:
            await stream.close()
