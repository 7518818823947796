"""What each Carlos agent would plausibly say, for the offline LLM simulator.

`carlos_responder` (settings.LLM_SIMULATOR_RESPONDER) recognises the agent from the
`AGENT: <name>` line that opens every system prompt and answers in that agent's format,
deterministically, from the request text, the options and the clarifications in the prompt:
two differing 11-section designs naming real services of the chosen cloud, analyst JSON that
validates against agents/schemas.py, a strict verdict and recommendation line, Terraform in
four files for the recommended design's own services, and 3-5 clarifying questions. So the
whole product works, and can be tested, with no model and no network.

Modules: `text` reads the prompt back (request, options, round, wording), `facts` reads the
request as a reader would (what is being built, internal or public, the figures as stated),
`catalog` prices each architect's services, `requirements`, `designs`, `analyses` and
`verdicts` write the agents' answers, `terraform` provisions the services of the design its
prompt carries from per-service HCL templates, `dispatch` picks the agent and `endpoint`
runs an in-process simulator with this responder.
"""

from agents.simulated.catalog import CATALOG
from agents.simulated.dispatch import agent_of, carlos_responder
from agents.simulated.endpoint import in_process_endpoint

__all__ = ["CATALOG", "agent_of", "carlos_responder", "in_process_endpoint"]
