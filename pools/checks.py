"""System checks: a bad pool configuration stops start-up with a message naming the setting."""

from django.core.checks import Error, Tags, register

from pools.engine.config import ConfigErrors
from pools.runtime import load_config


@register(Tags.compatibility, deploy=False)
def check_pool_configuration(app_configs=None, **kwargs) -> list[Error]:
    try:
        config = load_config()
    except ConfigErrors as problems:
        return [
            Error(problem.message, hint=None, obj=problem.setting, id="pools.E001")
            for problem in problems.errors
        ]
    errors = []
    if config.total_slots > config.http.max_connections:
        errors.append(
            Error(
                f"the pools hold {config.total_slots} slots but HTTP_MAX_CONNECTIONS is "
                f"{config.http.max_connections}",
                hint="Raise HTTP_MAX_CONNECTIONS or lower POOL_SIZE.",
                obj="CARLOS_POOLS['HTTP']['MAX_CONNECTIONS'] (HTTP_MAX_CONNECTIONS)",
                id="pools.E002",
            )
        )
    return errors
