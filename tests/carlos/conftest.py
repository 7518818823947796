"""The telemetry tests' fixtures: the loopback receivers of `telemetry_receivers`, started
and stopped, and an environment without the machine's telemetry variables."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import pytest

from tests.carlos.telemetry_receivers import (
    AZURE_QUIET,
    OTEL_VARIABLES,
    Receiver,
    SilentCollector,
)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def silent() -> Iterator[SilentCollector]:
    collector = SilentCollector()
    try:
        yield collector
    finally:
        collector.stop()


@pytest.fixture
def clean_env(monkeypatch) -> pytest.MonkeyPatch:
    """No OTEL_* or Application Insights variable from the environment the tests run in."""
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def azure_quiet(clean_env, tmp_path) -> pytest.MonkeyPatch:
    """Microsoft's exporter kept on loopback, its offline-retry files in this test's folder."""
    for name, value in AZURE_QUIET.items():
        clean_env.setenv(name, value)
    clean_env.setattr(tempfile, "tempdir", str(tmp_path))
    return clean_env
