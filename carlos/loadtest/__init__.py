"""The load test behind `manage.py loadtest`: many users designing at once against faults.

Why a separate world: the figures must describe the product as it is deployed (Daphne
through `manage.py serve`, the real pools, the pipeline, the channel layer, SQLite), not a
test harness. So the run starts its own server and offline simulator as child processes on
loopback, with a throwaway database, and drives them only from outside: HTTP pages with
CSRF and session cookies, the design WebSocket with the right Origin, `/health`, and the
simulator's control endpoints. A separate probe process times `/health` so the load
generator's own CPU does not flatter or spoil that figure.

The run has phases, reported separately: setup; logins (a few users at a time: each login
is a PBKDF2 hash, about a second of the server's CPU); designs (every user submits at once,
then watches on the socket until a terminal status); checks (pools idle, connections closed,
no design left unfinished). It is bounded by `--timeout`: what has not finished by then is
reported as "not terminal".

With `--rolling-restart` the run is a deploy under load: two servers share the database and
the simulator (users alternate between them), and once the designs are under way each is
stopped with SIGTERM, waited for (it drains: no new design, running agents get up to
DRAIN_SECONDS, the rest are handed back to resume elsewhere) and started again on its port,
one after the other. The users ride it out as the page does (a refused connection goes to
the other server, a closed socket reconnects there and asks for snapshots, since without
Redis events do not cross processes), and the simulator's request log shows which agent
calls were made twice.

With `--workers N` the server is `serve --workers N` (N processes on one port, sharing
capacity and live streams through the Redis at REDIS_URL, under a key prefix of the run's
own that is deleted afterwards); its readings (CPU, sockets, memory) cover every process,
and the leak checks read each worker's pools from `/health?scope=cluster`.

The modules, by concern: `options` (what to run), `world` (the throwaway database, users,
simulator and servers), `users` (the simulated users' journeys), `probe` (the /health probe
process, and the login storm's page user), `readings` (/proc), `checks` (leaks after the
run), `rolling` (the restarts), `report` (figures, table, targets), `run` (the phases in
order), `storm` (`manage.py loginstorm`). The child processes are `carlos.processes`'.

Nothing here imports Django at module level, so `python -m carlos.loadtest.probe ...` (the
probe process) starts fast and stays independent of the settings.
"""
