"""Every agent described once: who it is, where it runs, how it is asked, shown and simulated.

Why: an agent's facts used to be spread over the roster, the pool map, the tab labels, the
schema map, the renderer's branches and the benchmark's timings, so a new agent meant edits
in nine places. Here one frozen `AgentSpec` per agent, in pipeline order, is read by all of
them: the pipeline runs the specs of a stage with several agents (designs, analyses), the
design page shows one tab per spec, the renderer picks the template the spec names.

The callables a spec refers to (message builder, schema, simulated answer) may be given as
dotted paths, resolved when first used (as Django's own settings do), so this module imports
nothing of the app and every other module may import it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from django.utils.module_loading import import_string


class Stage(StrEnum):
    """The pipeline's stages, in the order it runs them."""

    REQUIREMENTS = "requirements"
    DESIGNS = "designs"
    ANALYSES = "analyses"
    AUDIT = "audit"
    RECOMMENDATION = "recommendation"
    TERRAFORM = "terraform"


STAGE_ORDER: tuple[Stage, ...] = tuple(Stage)


class Output(StrEnum):
    """What an agent answers, which decides how it is checked and shown."""

    MARKDOWN = "markdown"
    LABELLED = "labelled"  # markdown in `LABEL:` lines (VERDICT:, STRENGTHS:...)
    JSON = "json"  # one JSON object valid against the spec's schema
    TERRAFORM = "terraform"  # four .tf files under headings, then deployment steps


# The longest key AgentRun.agent can store.
MAX_KEY_LENGTH = 20


def resolve(reference: Any) -> Any:
    """A dotted path's object (imported now), or the object itself."""
    return import_string(reference) if isinstance(reference, str) else reference


@dataclass(frozen=True)
class AgentSpec:
    """One agent, declaratively.

    `messages` builds its prompt (a function of agents.prompts; the arguments are those of
    its stage). `simulated` answers a request for it in the offline simulator, as a
    function of the ChatRequest (the shipped agents' are in agents.simulated.dispatch);
    None leaves it to the simulator's default paragraph.
    `emulated_seconds` is the original's documented latency range, which the benchmark
    reproduces.
    """

    key: str
    label: str
    tab: str
    pool: str
    stage: Stage
    messages: str | Callable[..., list[dict[str, str]]]
    output: Output = Output.MARKDOWN
    schema: str | type | None = None
    template: str | None = None
    simulated: str | Callable[[Any], str] | None = None
    emulated_seconds: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if self.output == Output.JSON and (self.schema is None or self.template is None):
            raise ValueError(f"agent {self.key!r} answers JSON: it needs a schema and a template")

    def build_messages(self, *args: Any, **kwargs: Any) -> list[dict[str, str]]:
        """The prompt, from the builder the spec names."""
        return resolve(self.messages)(*args, **kwargs)

    @property
    def schema_class(self) -> type:
        """The pydantic model its JSON must match; LookupError for an agent without one."""
        if self.schema is None:
            raise LookupError(f"agent {self.key!r} has no report schema")
        return resolve(self.schema)

    @property
    def simulated_answer(self) -> Callable[[Any], str] | None:
        return resolve(self.simulated)


_PROMPTS = "agents.prompts."
_SIMULATED = "agents.simulated.dispatch."


def _alone(
    key: str,
    label: str,
    stage: Stage,
    emulated_seconds: tuple[float, float],
    output: Output = Output.MARKDOWN,
    pool: str = "main",
) -> AgentSpec:
    """An agent alone in its stage: its tab is the stage's name, its prompt builder and
    simulated answer are named after its key."""
    return AgentSpec(
        key=key,
        label=label,
        tab=stage.capitalize(),
        pool=pool,
        stage=stage,
        messages=f"{_PROMPTS}{key}_messages",
        output=output,
        simulated=_SIMULATED + key,
        emulated_seconds=emulated_seconds,
    )


def _architect(key: str, label: str, pool: str) -> AgentSpec:
    """Carlos and Ronei: the same stage and prompt, each on its own pool."""
    return AgentSpec(
        key=key,
        label=label,
        tab=key.capitalize(),
        pool=pool,
        stage=Stage.DESIGNS,
        messages=_PROMPTS + "design_messages",
        simulated=_SIMULATED + "design",
        emulated_seconds=(15, 25),
    )


def _analyst(key: str, schema: str) -> AgentSpec:
    """The analysts: each reviews both designs into a JSON report of its own schema."""
    return AgentSpec(
        key=key,
        label=f"{key.capitalize()} analyst",
        tab=key.capitalize(),
        pool="mini",
        stage=Stage.ANALYSES,
        messages=_PROMPTS + "analyst_messages",
        output=Output.JSON,
        schema=f"agents.schemas.{schema}",
        template=f"agents/analysis/{key}.html",
        simulated=_SIMULATED + "analysis",
        emulated_seconds=(5, 10),
    )


# The shipped agents, in pipeline order (ANCHORS.md section 1 for pools and latencies).
AGENT_SPECS: tuple[AgentSpec, ...] = (
    _alone("requirements", "Requirements analyst", Stage.REQUIREMENTS, (2, 3), pool="mini"),
    _architect("carlos", "Carlos (lead architect)", pool="main"),
    _architect("ronei", "Ronei (rival architect)", pool="ronei"),
    _analyst("security", "SecurityReport"),
    _analyst("cost", "CostReport"),
    _analyst("reliability", "ReliabilityReport"),
    _alone("auditor", "Auditor", Stage.AUDIT, (3, 5), Output.LABELLED),
    _alone("recommender", "Recommender", Stage.RECOMMENDATION, (2, 3), Output.LABELLED),
    _alone("terraform", "Terraform coder", Stage.TERRAFORM, (10, 20), Output.TERRAFORM),
)

# What is in force: the shipped table, plus what a test registered for a while.
_registered: tuple[AgentSpec, ...] = AGENT_SPECS


def registered() -> tuple[AgentSpec, ...]:
    """Every agent in force, in pipeline order (stage by stage, table order within one)."""
    return _registered


def spec_for(key: str) -> AgentSpec:
    """The spec of agent `key`; KeyError for an agent nobody declared."""
    for spec in _registered:
        if spec.key == key:
            return spec
    raise KeyError(f"no agent {key!r}; known: {[spec.key for spec in _registered]}")


def find_spec(key: str | None) -> AgentSpec | None:
    """The spec of agent `key`, or None (a retired agent's old run, an unknown caller)."""
    return next((spec for spec in _registered if spec.key == key), None)


def specs_in_stage(stage: Stage | str) -> tuple[AgentSpec, ...]:
    """The agents of one stage, in table order (those of a parallel stage run together)."""
    return tuple(spec for spec in _registered if spec.stage == stage)


def only_in_stage(stage: Stage | str) -> AgentSpec:
    """The single agent of a sequential stage."""
    found = specs_in_stage(stage)
    if len(found) != 1:
        raise LookupError(f"stage {stage!r} has {len(found)} agents, not one")
    return found[0]


def agent_choices() -> list[tuple[str, str]]:
    """AgentRun.agent's choices: a callable, so a new agent needs no migration."""
    return [(spec.key, spec.label) for spec in _registered]


def pools_in_use() -> tuple[str, ...]:
    """The pools the agents use, each once, in the order they are first needed."""
    return tuple(dict.fromkeys(spec.pool for spec in _registered))


def tab_labels() -> dict[str, str]:
    """Each agent's tab label on the design page, by key."""
    return {spec.key: spec.tab for spec in _registered}


@contextlib.contextmanager
def extra_spec(spec: AgentSpec) -> Iterator[AgentSpec]:
    """Put `spec` in force for the block, after the last agent of its stage (for tests).

    The table is process-wide: every part of the product sees the extra agent until the
    block ends, then it is gone again.
    """
    global _registered
    if find_spec(spec.key) is not None:
        raise ValueError(f"agent {spec.key!r} is already declared")
    if len(spec.key) > MAX_KEY_LENGTH:
        raise ValueError(f"agent key {spec.key!r} is longer than {MAX_KEY_LENGTH} characters")
    before = _registered
    rank = STAGE_ORDER.index(Stage(spec.stage))
    position = sum(1 for known in before if STAGE_ORDER.index(known.stage) <= rank)
    _registered = (*before[:position], spec, *before[position:])
    try:
        yield spec
    finally:
        _registered = before
