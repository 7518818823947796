"""The simulator's own endpoints, under /_simulator/: its state, live settings and log.

What a test or an operator in another process uses to observe and steer a running
simulator; these requests stay out of the counters they read.
"""

from typing import TYPE_CHECKING

from pools.simulator.validation import allow, bad_param, parse_json_object
from pools.simulator.wire import Connection, HTTPError, Request

if TYPE_CHECKING:
    from pools.simulator.server import LLMSimulator

__all__ = ["serve_control"]


async def serve_control(sim: "LLMSimulator", conn: Connection, req: Request) -> None:
    """GET stats, GET/POST faults, GET requests[?since=SEQ], POST reset."""
    answer = sim.writer.json
    if req.path == "/_simulator/stats":
        allow(req, "GET")
        await answer(conn, 200, sim.stats.as_dict())
    elif req.path == "/_simulator/faults":
        if req.method == "GET":
            await answer(conn, 200, sim.fault_settings())
            return
        allow(req, "POST")
        changes = parse_json_object(req.body)
        try:
            settings = sim.apply_faults(changes)
        except ValueError as exc:
            raise HTTPError(400, str(exc), code="invalid_fault_settings") from exc
        await answer(conn, 200, settings)
    elif req.path == "/_simulator/requests":
        allow(req, "GET")
        since = req.query.get("since", ["0"])[0]
        try:
            after = int(since)
        except ValueError as exc:
            raise bad_param("since", f"'since' must be a whole number, got {since!r}.") from exc
        await answer(conn, 200, sim.request_log.snapshot(after))
    elif req.path == "/_simulator/reset":
        allow(req, "POST")
        sim.reset_stats()
        await answer(conn, 200, sim.stats.as_dict())
    else:
        raise HTTPError(
            404,
            f"Unknown simulator endpoint {req.path}; try /_simulator/stats, "
            "/_simulator/faults, /_simulator/requests or /_simulator/reset.",
            code="unknown_url",
        )
