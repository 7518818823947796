"""Server policy: where a server's LLM calls run, how it warms its pools and how it stops.

`llm_loop()` is the thread and event loop where the server's LLM calls run (designs,
warm-up), apart from the loop that answers requests; `warm_up` and `shut_down` are the
server's start and stop, used by `manage.py serve` and by the ASGI lifespan wrapper.
"""

from __future__ import annotations

import gc
import weakref

from carlos.worker_loop import WorkerLoop
from pools.engine.registry import PoolRegistry

GC_YOUNG_THRESHOLD = 20_000
# 0.5 ms instead of CPython's 5 ms: measured in the load test, /health p50 fell from 30 ms
# to 7 ms while the LLM loop streamed (README, "Load and faults").
_llm_loop = WorkerLoop("llm", switch_interval=0.0005)


def llm_loop() -> WorkerLoop:
    """The process's LLM loop: designs stream there, so streaming never delays a request."""
    return _llm_loop


# The registries whose warm-up has begun in this process (weakly: tests install many).
_warm_ups: weakref.WeakSet[PoolRegistry] = weakref.WeakSet()


def warm_up_begun(registry: PoolRegistry) -> bool:
    """Whether this process began to warm `registry` (`serve`, a lifespan start-up or the
    first request under a plain Daphne): what `carlos.lifespan` asks before starting, and
    how /health tells "warming up" from "nobody warms them"."""
    return registry in _warm_ups


async def warm_up(registry: PoolRegistry) -> None:
    """Open the pools' connections on the LLM loop, where the calls will use them."""
    _warm_ups.add(registry)  # before the first await: a request served meanwhile sees it
    try:
        await _llm_loop.run(registry.initialize())
    except BaseException:
        _warm_ups.discard(registry)  # not warming any more: readiness says "not initialized"
        raise


def tune_gc_for_serving() -> None:
    """Once the server is up, make the cyclic garbage collector's pauses short and rare.

    Why: a collection holds the GIL, so it stalls every thread; the load test saw full
    passes of 180-375 ms while 200 designs ran. What exists after start-up (modules,
    settings, templates, warm clients) lives as long as the process: frozen, full passes
    no longer scan it. A young generation of GC_YOUNG_THRESHOLD objects instead of 700
    lets a request's objects die young rather than be promoted, on the way to a full pass,
    while the request waits seconds in line. Call it once, after warm-up.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


async def shut_down(registry: PoolRegistry) -> None:
    """Stop what runs on the LLM loop (designs end interrupted), close its clients, then
    close the registry (refusing new calls and closing every other loop's clients)."""
    await _llm_loop.stop(cleanup=registry.aclose_loop)
    await registry.close()
