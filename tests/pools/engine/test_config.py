"""Pool configuration: defaults from the design note, the size knob, precise errors."""

from __future__ import annotations

import pytest
from django.core.checks import Tags, run_checks
from django.test import override_settings

from pools.engine.config import ConfigErrors, parse_config
from pools.runtime import get_pool


def test_defaults_match_the_design_note():
    config = parse_config({"ENDPOINT": {"SIMULATOR_URL": "http://127.0.0.1:9/v1"}})
    sizes = {name: (p.model, p.temperature, p.size) for name, p in config.pools.items()}
    assert sizes == {
        "main": ("gpt-4o", 0.7, 10),
        "ronei": ("gpt-4o", 0.9, 5),
        "mini": ("gpt-4o-mini", 0.7, 10),
    }
    assert (config.http.max_connections, config.http.max_keepalive_connections) == (100, 20)
    assert config.endpoint.kind == "simulator"


def test_global_size_knob_and_per_pool_override():
    config = parse_config(
        {
            "ENDPOINT": {"SIMULATOR_URL": "http://127.0.0.1:9/v1"},
            "SIZE": 20,
            "POOLS": {"main": {}, "ronei": {}, "mini": {"SIZE": 3}},
        }
    )
    assert {n: p.size for n, p in config.pools.items()} == {"main": 20, "ronei": 10, "mini": 3}
    resized = config.with_size(4)
    assert {n: p.size for n, p in resized.pools.items()} == {"main": 4, "ronei": 2, "mini": 3}


def test_endpoint_kinds():
    azure = parse_config(
        {
            "ENDPOINT": {
                "AZURE_ENDPOINT": "https://x.openai.azure.com/",
                "AZURE_API_KEY": "sk-42",
                "AZURE_API_VERSION": "2024-10-21",
            }
        }
    )
    assert azure.endpoint.kind == "azure"
    assert azure.endpoint.public_url == "https://x.openai.azure.com"
    assert "sk-42" not in repr(azure.endpoint)
    plain = parse_config({"ENDPOINT": {"BASE_URL": "http://localhost:11434/v1", "API_KEY": "o"}})
    assert plain.endpoint.kind == "openai"


@pytest.mark.parametrize(
    ("raw", "setting", "fragment"),
    [
        ({"SIZE": 0}, "CARLOS_POOLS['SIZE'] (POOL_SIZE)", "at least 1"),
        ({"BOGUS": 1}, "CARLOS_POOLS['BOGUS']", "unknown key"),
        ({"POOLS": {"main": {"SIZE": -1}}}, "CARLOS_POOLS['POOLS']['main']['SIZE']", "at least 1"),
        ({"POOLS": {"main": {"COLOUR": 1}}}, "CARLOS_POOLS['POOLS']['main']['COLOUR']", "unknown"),
        ({"POOLS": {"main": {"TEMPERATURE": 3}}}, "['TEMPERATURE']", "0 to 2"),
        ({"POOLS": {"x": {}}}, "CARLOS_POOLS['POOLS']['x']['MODEL']", "required"),
        ({"ENDPOINT": {"BASE_URL": "ftp://nope"}}, "LLM_BASE_URL", "not a valid http(s) URL"),
        ({"ENDPOINT": {"BASE_URL": "http://h/v1"}}, "LLM_API_KEY", "required"),
        ({"ENDPOINT": {"AZURE_ENDPOINT": "https://a.example"}}, "AZURE_OPENAI_API_KEY", "required"),
        ({"ENDPOINT": {"SIMULATOR_URL": ""}}, "LLM_SIMULATOR_URL", "no endpoint is configured"),
        ({"HTTP": {"MAX_CONNECTIONS": 0}}, "HTTP_MAX_CONNECTIONS", "at least 1"),
    ],
)
def test_bad_configuration_names_the_setting(raw, setting, fragment):
    raw = {"ENDPOINT": {"SIMULATOR_URL": "http://127.0.0.1:9/v1"}, **raw}
    with pytest.raises(ConfigErrors) as caught:
        parse_config(raw)
    problems = {(e.setting, e.message) for e in caught.value.errors}
    assert any(setting in s and fragment in m for s, m in problems), problems


def test_bad_url_is_shown_without_credentials():
    with pytest.raises(ConfigErrors) as caught:
        parse_config({"ENDPOINT": {"BASE_URL": "ftp://user:s3cret@host/v1", "API_KEY": "k"}})
    assert "s3cret" not in str(caught.value)


def test_system_check_reports_every_problem():
    bad = {"ENDPOINT": {"BASE_URL": "nope"}, "SIZE": 0}
    with override_settings(CARLOS_POOLS=bad):
        errors = [e for e in run_checks(tags=[Tags.compatibility]) if e.id == "pools.E001"]
    assert {e.obj for e in errors} >= {"LLM_BASE_URL", "CARLOS_POOLS['SIZE'] (POOL_SIZE)"}
    assert all(e.msg for e in errors)


def test_system_check_rejects_more_slots_than_connections():
    with override_settings(
        CARLOS_POOLS={"ENDPOINT": {"SIMULATOR_URL": "http://127.0.0.1:9/v1"}, "SIZE": 60}
    ):
        errors = [e for e in run_checks(tags=[Tags.compatibility]) if e.id == "pools.E002"]
    assert len(errors) == 1 and "150 slots" in errors[0].msg


def test_get_pool_size_argument_is_never_ignored():
    with override_settings(CARLOS_POOLS={"ENDPOINT": {"SIMULATOR_URL": "http://127.0.0.1:9/v1"}}):
        registry = get_pool()
        assert get_pool() is registry
        get_pool(size=4)
        assert {n: p.stats().total for n, p in registry.pools.items()} == {
            "main": 4,
            "ronei": 2,
            "mini": 4,
        }


def test_numbers_from_the_environment_are_text():
    config = parse_config(
        {
            "ENDPOINT": {"SIMULATOR_URL": "http://127.0.0.1:9/v1"},
            "SIZE": "6",
            "HTTP": {"MAX_CONNECTIONS": "50", "READ_TIMEOUT": "12.5"},
            "POOLS": {"main": {"MAX_OVERFLOW": "", "TIMEOUT": "3", "MAX_WAITING": "4"}},
        }
    )
    main = config.pools["main"]
    assert (main.size, main.max_overflow, main.timeout, main.max_waiting) == (6, None, 3.0, 4)
    assert (config.http.max_connections, config.http.read_timeout) == (50, 12.5)
    with pytest.raises(ConfigErrors, match=r"POOL_SIZE.*got 'ten'"):
        parse_config({"ENDPOINT": {"SIMULATOR_URL": "http://127.0.0.1:9/v1"}, "SIZE": "ten"})
