"""`manage.py design`: the same pipeline from the command line, standalone or on an endpoint."""

from __future__ import annotations

import io
import json
import re

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from agents.models import Design
from agents.options import AGENTS
from agents.simulated import carlos_responder
from pools import runtime

pytestmark = pytest.mark.django_db(transaction=True)

REQUEST = "A recipe sharing site with photo uploads for 10k users"


def run_command(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("design", REQUEST, *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_json_document_with_every_run_from_the_in_process_simulator():
    out, err = run_command(
        "--cloud", "aws", "--priority", "performance", "--reliability", "high", "--json", "--fast"
    )

    document = json.loads(out)
    design = document["design"]
    assert design["status"] == "succeeded"
    assert design["request_text"] == REQUEST
    assert design["options"]["cloud"] == "aws"
    assert design["options"]["reliability"] == "high"
    assert (design["verdict"], design["recommendation"]) == ("APPROVED", "RONEI")
    assert design["owner"] == "cli"  # no superuser exists: the cli user is created
    assert [run["agent"] for run in document["runs"]] == list(AGENTS)
    for run in document["runs"]:
        assert run["status"] == "succeeded"
        assert run["ttft_ms"] is not None and run["wait_ms"] is not None
        assert run["duration_ms"] > 0 and run["tokens_out"] > 0
        assert run["output_text"]
    assert "Amazon EKS" in document["runs"][2]["output_text"]
    assert list(document["terraform_files"]) == [
        "versions.tf",
        "variables.tf",
        "main.tf",
        "outputs.tf",
    ]
    # Progress goes to stderr in JSON mode: a start and a finish line per agent.
    assert "offline simulator at http://127.0.0.1:" in err
    assert "▶ Requirements analyst started on pool mini (gpt-4o-mini)" in err
    assert "▶ Ronei (rival architect) started on pool ronei" in err
    assert err.count(" started on pool ") == len(AGENTS)
    assert err.count("✔ ") == len(AGENTS)
    assert "✔ Terraform coder succeeded in " in err and ", pool main," in err
    assert "■ design succeeded (verdict APPROVED; recommendation RONEI)" in err
    # The in-process simulator's registry was only installed for the command.
    simulator_url = re.search(r"offline simulator at (\S+)", err)[1]
    assert runtime.get_pool().config.endpoint.base_url != simulator_url


def test_markdown_report_saved_to_a_file_for_an_existing_user(tmp_path):
    user = get_user_model().objects.create_user("grace")
    get_user_model().objects.create_superuser("root", password="x")
    target = tmp_path / "design.md"

    out, _err = run_command("--user", "grace", "--cloud", "gcp", "--output", str(target), "--fast")

    assert f"Saved to {target}" in out
    report = target.read_text(encoding="utf-8")
    design = Design.objects.get()
    assert design.owner == user
    assert report.startswith(f"# Design #{design.pk}: {REQUEST}")
    assert "status succeeded · verdict APPROVED · recommendation CARLOS" in report
    for heading in (
        "## Requirements analyst",
        "## Carlos (lead architect)",
        "## Cost analyst",
        "## Terraform coder",
    ):
        assert heading in report
    assert '"monthly_usd"' in report  # analyst JSON, pretty-printed
    assert "Cloud Run" in report
    assert "Terraform files: versions.tf, variables.tf, main.tf, outputs.tf" in report


def test_default_owner_is_the_first_superuser():
    admin = get_user_model().objects.create_superuser("admin", password="x")
    run_command("--fast", "--json")
    assert Design.objects.get().owner == admin
    assert not get_user_model().objects.filter(username="cli").exists()


def test_an_unknown_user_or_option_is_refused():
    with pytest.raises(CommandError, match="No user named 'nobody'"):
        run_command("--user", "nobody")
    with pytest.raises(CommandError, match="invalid choice: 'mars'"):
        run_command("--cloud", "mars")
    assert not Design.objects.exists()


def test_a_configured_endpoint_is_used_instead_of_a_simulator(simulator_thread, settings):
    simulator_thread.responder = carlos_responder
    settings.CARLOS_POOLS = {"ENDPOINT": {"BASE_URL": simulator_thread.base_url, "API_KEY": "k"}}

    out, err = run_command("--json")

    assert json.loads(out)["design"]["status"] == "succeeded"
    assert "offline simulator" not in err
    assert simulator_thread.stats.chat_requests == len(AGENTS)


def test_benchmark_reports_wall_time_against_the_critical_path():
    out = io.StringIO()
    call_command(
        "benchmark_pipeline", "--designs", "3", "--scale", "0.01", "--brief", "--json", stdout=out
    )

    report = json.loads(out.getvalue())
    assert (report["designs"], report["succeeded"], report["answers"]) == (3, 3, "brief")
    assert [row["stage"] for row in report["stages"]] == [
        "requirements",
        "designs",
        "analysts",
        "auditor",
        "recommender",
        "terraform",
    ]
    assert [row["calls"] for row in report["stages"]] == [3, 6, 9, 3, 3, 3]
    # The critical path adds the planned stages (each within its scaled range) of a design.
    lowest = sum(0.01 * low for low in (2, 15, 5, 3, 2, 10))
    assert report["critical_path_s"] >= lowest
    assert report["wall_time_s"] >= report["critical_path_s"]
    ratio = report["wall_time_s"] / report["critical_path_s"]
    assert report["ratio"] == pytest.approx(ratio, abs=0.005)
    assert report["pools"]["mini"]["size"] == 10 and report["pools"]["ronei"]["size"] == 5
    owners = {d.owner.get_username() for d in Design.objects.select_related("owner")}
    assert owners == {"benchmark"}
    assert report["database"]["owner"] == "benchmark"


def test_help_lists_every_option_value():
    from agents.management.commands.design import Command

    text = " ".join(Command().create_parser("manage.py", "design").format_help().split())
    assert "--reliability {normal,high,extreme}" in text
    assert "normal (Normal (99.5-99.9%))" in text
    assert "--cloud {azure,aws,gcp}" in text
