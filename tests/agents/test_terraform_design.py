"""The Terraform coder provisions the services of the design it was given, not a fixed stack.

The expectations below are this test's own, short and explicit: the service names as the
designs' cost tables spell them, and the Terraform resource types each must bring. They are
deliberately not read from the simulator's catalogue, so a wrong table there cannot pass.
A service named in the design must bring its resources; a resource listed here for a service
the design does not name must not appear (the old coder emitted RDS, SQS and S3 for every
Ronei design on AWS, whatever it contained).
"""

from __future__ import annotations

import re

import hcl2
import pytest

from agents import prompts
from agents.models import AgentRun, Design
from agents.pipeline import create_design, run_design
from agents.terraform import split_terraform
from tests.agents.test_simulated import ask

# design service name -> resource types it must bring (and that nothing else may bring).
EXPECTED: dict[str, dict[str, set[str]]] = {
    "aws": {
        "Amazon EKS": {"aws_eks_cluster", "aws_eks_node_group"},
        "Amazon ECS on AWS Fargate": {"aws_ecs_cluster", "aws_ecs_service"},
        "AWS Lambda": {"aws_lambda_function"},
        "Amazon RDS for PostgreSQL": {"aws_db_instance"},
        "Amazon DynamoDB": {"aws_dynamodb_table"},
        "Amazon Kinesis Data Streams": {"aws_kinesis_stream"},
        "Amazon SQS and Amazon SNS": {"aws_sqs_queue"},  # SNS topics also carry alarms
        "Amazon S3": {"aws_s3_bucket"},
        "Amazon ElastiCache for Redis": {"aws_elasticache_replication_group"},
        "Amazon CloudFront": {"aws_cloudfront_distribution"},
        "Application Load Balancer with AWS WAF": {"aws_lb", "aws_wafv2_web_acl"},
        "Internal Application Load Balancer": {"aws_lb"},
        "Amazon ECR": {"aws_ecr_repository"},
        "AWS Glue": {"aws_glue_job"},
        "Amazon Redshift Serverless": {"aws_redshiftserverless_workgroup"},
        "Amazon Cognito": {"aws_cognito_user_pool"},
        "AWS Secrets Manager and AWS KMS": {"aws_secretsmanager_secret", "aws_kms_key"},
        "AWS Client VPN": {"aws_ec2_client_vpn_endpoint"},
        "AWS PrivateLink": {"aws_vpc_endpoint"},
        "AWS Backup": {"aws_backup_plan"},
    },
    "azure": {
        "Azure Kubernetes Service (AKS)": {"azurerm_kubernetes_cluster"},
        "Azure App Service": {"azurerm_linux_web_app"},
        "Azure Container Apps": {"azurerm_container_app"},
        "Azure Functions": {"azurerm_linux_function_app"},
        "Azure SQL Database": {"azurerm_mssql_database"},
        "Azure Cosmos DB": {"azurerm_cosmosdb_account"},
        "Azure Cache for Redis": {"azurerm_redis_cache"},
        "Azure Blob Storage": {"azurerm_storage_container"},
        "Azure Service Bus": {"azurerm_servicebus_queue"},
        "Azure Event Hubs": {"azurerm_eventhub"},
        "Azure Front Door": {"azurerm_cdn_frontdoor_profile"},
        "Azure Application Gateway": {"azurerm_application_gateway"},
        "Azure Application Gateway (private frontend)": {"azurerm_application_gateway"},
        "Azure Container Registry": {"azurerm_container_registry"},
        "Azure Data Factory": {"azurerm_data_factory"},
        "Azure Synapse Analytics": {"azurerm_synapse_workspace"},
        "Azure Key Vault": {"azurerm_key_vault"},
        "Azure VPN Gateway": {"azurerm_virtual_network_gateway"},
        "Azure Private Link": {"azurerm_private_endpoint"},
    },
    "gcp": {
        "Google Kubernetes Engine (GKE)": {"google_container_cluster"},
        "Cloud Run": {"google_cloud_run_v2_service"},
        "Cloud Run functions": {"google_cloudfunctions2_function"},
        "Cloud SQL for PostgreSQL": {"google_sql_database_instance"},
        "Firestore": {"google_firestore_database"},
        "Memorystore for Redis": {"google_redis_instance"},
        "Pub/Sub": {"google_pubsub_topic"},
        "Dataflow": {"google_dataflow_job"},
        "BigQuery": {"google_bigquery_dataset"},
        "Artifact Registry": {"google_artifact_registry_repository"},
        "Cloud CDN": {"google_compute_backend_bucket"},
        "External Application Load Balancer with Cloud Armor": {"google_compute_security_policy"},
        "Secret Manager and Cloud KMS": {"google_secret_manager_secret", "google_kms_crypto_key"},
        "Cloud VPN": {"google_compute_ha_vpn_gateway"},
        "Identity-Aware Proxy": {"google_iap_web_iam_member"},
    },
}
CHOICE_BY_PRIORITY = {"CARLOS": "cost", "RONEI": "performance"}
REQUESTS = {
    "web_app": "A ride-sharing app for 1 million users across the United States",
    "data_pipeline": "An IoT telemetry pipeline for 20,000 devices sending 5,000 events per second",
    "microservices": "An order-processing backend of microservices for an online shop",
    "internal": "An internal HR portal for 500 employees",
}


def named_services(design: str) -> list[str]:
    """The service names of the design's cost table (its bill of materials)."""
    rows = re.findall(r"^\| ([^|*][^|]*?) \| [^|]* \| \$[\d,]+ \|$", design, re.MULTILINE)
    assert rows, "the design has no cost table"
    return rows


def resource_types(answer: str) -> set[str]:
    files = split_terraform(answer)
    assert list(files) == list(prompts.TERRAFORM_FILES)
    main = hcl2.loads(files["main.tf"])
    for name in ("versions.tf", "variables.tf", "outputs.tf"):
        hcl2.loads(files[name])  # every file parses
    return {kind.strip('"') for block in main.get("resource", []) for kind in block}


def unresolved(answer: str) -> set[str]:
    """References in the HCL to resources, data sources, variables or locals never declared
    (services' templates are composed per design, so one must not lean on another's)."""
    files = split_terraform(answer)
    hcl = "\n".join(files.values())
    declared = {
        f"{kind}.{name}" for kind, name in re.findall(r'^resource "(\w+)" "(\w+)"', hcl, re.M)
    }
    declared |= {f"data.{k}.{n}" for k, n in re.findall(r'^data "(\w+)" "(\w+)"', hcl, re.M)}
    declared |= {f"var.{name}" for name in re.findall(r'^variable "(\w+)"', hcl, re.M)}
    locals_block = re.search(r"^locals \{\n(.*?)^\}", hcl, re.M | re.S)
    declared |= {
        f"local.{name}"
        for name in re.findall(r"^  (\w+)\s+=", locals_block[1] if locals_block else "", re.M)
    }
    used = set(re.findall(r"(?<![\w.])((?:data\.)?(?:aws|azurerm|google)_\w+\.\w+)", hcl))
    used |= set(re.findall(r"(?<![\w.])((?:var|local)\.\w+)", hcl))
    return used - declared


def chain(brief: prompts.Brief) -> tuple[str, str, str]:
    """The real prompts, agent after agent, as the pipeline chains them: (choice, design, tf)."""
    requirements = ask(prompts.requirements_messages(brief))
    designs = {a: ask(prompts.design_messages(a, brief, requirements)) for a in ("carlos", "ronei")}
    analyses = {
        a: ask(prompts.analyst_messages(a, brief, requirements, designs, 0))
        for a in ("security", "cost", "reliability")
    }
    audit = ask(
        prompts.auditor_messages(brief, requirements, designs, analyses, 0, final_round=True)
    )
    choice = prompts.parse_recommendation(
        ask(prompts.recommender_messages(brief, designs, analyses, audit))
    )
    design = designs["carlos" if choice == prompts.RECOMMEND_CARLOS else "ronei"]
    return choice, design, ask(prompts.terraform_messages(brief, choice, design))


def assert_matches(cloud: str, design: str, answer: str) -> None:
    """Every expected service named in the design is provisioned, and nothing unnamed is."""
    named = set(named_services(design))
    found = resource_types(answer)
    expected = EXPECTED[cloud]
    for service, kinds in expected.items():
        if service in named:
            assert kinds <= found, f"{service} is in the design but {kinds - found} are missing"
    wanted = set().union(*(kinds for service, kinds in expected.items() if service in named))
    for service, kinds in expected.items():
        if service not in named:
            stray = (kinds - wanted) & found
            assert not stray, f"{sorted(stray)} provisioned, but the design has no {service}"
    assert not unresolved(answer)
    prose = re.sub(r"```.*?```", "", answer, flags=re.DOTALL)
    for service in named - set(expected):
        assert service in prose, f"{service} is neither provisioned nor named as left out"


@pytest.mark.parametrize("cloud", ["aws", "azure", "gcp"])
@pytest.mark.parametrize("choice", ["CARLOS", "RONEI"])
@pytest.mark.parametrize("kind", list(REQUESTS))
def test_terraform_provisions_the_recommended_designs_services(cloud, choice, kind):
    scenario = "web_app" if kind == "internal" else kind
    brief = prompts.Brief.build(
        REQUESTS[kind],
        {"cloud": cloud, "scenario": scenario, "priority": CHOICE_BY_PRIORITY[choice]},
    )
    chosen, design, answer = chain(brief)
    assert chosen == choice
    assert f"# {choice.capitalize()}'s design" in design
    assert f"{choice.capitalize()}'s design" in answer.splitlines()[0]
    assert_matches(cloud, design, answer)


def test_a_ronei_events_design_on_aws_gets_eks_dynamodb_and_kinesis_not_rds_sqs_s3():
    """The issue's case: EKS, DynamoDB and Kinesis recommended; RDS, SQS and S3 provisioned."""
    brief = prompts.Brief.build(
        REQUESTS["microservices"],
        {"cloud": "aws", "scenario": "microservices", "priority": "performance"},
    )
    choice, design, answer = chain(brief)
    assert choice == "RONEI"
    assert {"Amazon EKS", "Amazon DynamoDB", "Amazon Kinesis Data Streams"} <= set(
        named_services(design)
    )
    found = resource_types(answer)
    assert {"aws_eks_cluster", "aws_eks_node_group", "aws_dynamodb_table"} <= found
    assert "aws_kinesis_stream" in found
    assert not found & {"aws_db_instance", "aws_sqs_queue", "aws_s3_bucket"}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("cloud", ["aws", "azure", "gcp"])
@pytest.mark.parametrize("choice", ["CARLOS", "RONEI"])
async def test_the_real_pipeline_codes_the_recommended_design(
    carlos_registry, owner, cloud, choice
):
    """Whole designs over sockets through the pools: the stored Terraform matches the stored
    recommended design, for each cloud and either architect."""
    options = {"cloud": cloud, "scenario": "microservices", "priority": CHOICE_BY_PRIORITY[choice]}
    design = await create_design(owner, REQUESTS["microservices"], options)
    await run_design(design.pk)
    design = await Design.objects.aget(pk=design.pk)
    assert design.status == Design.Status.SUCCEEDED, design.error
    assert design.recommendation == choice
    runs = {
        run.agent: run.output_text
        async for run in AgentRun.objects.filter(design=design, status=AgentRun.Status.SUCCEEDED)
    }
    assert_matches(cloud, runs[choice.lower()], runs["terraform"])
