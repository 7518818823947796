"""`manage.py loadtest --workers 2`: the server under test is `serve --workers 2`, coordinating
through Redis under a key prefix of the run's own, deleted when the run ends.

The run goes through the real command in a child process, as in tests/carlos/test_loadtest.py;
only the simulator is made fast.
"""

from __future__ import annotations

import json

import redis

from tests.carlos.test_loadtest import FAST, leftovers, loadtest_process
from tests.helpers import services

REDIS_URL = services.CLUSTER_REDIS_URL


@services.needs_redis(REDIS_URL)
def test_a_run_with_two_workers_reports_them_and_leaves_nothing_behind(tmp_path):
    process = loadtest_process(
        tmp_path,
        *("--designs", "4", "--workers", "2", "--timeout", "120", "--json", *FAST),
        env_extra={"REDIS_URL": REDIS_URL},
    )
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err

    report = json.loads(out)
    setup = report["setup"]
    assert setup["workers"] == 2
    assert report["designs"]["terminal"] == 4, report["designs"]
    # The leak checks read both workers (their published stats) and discount their Redis
    # connections: every design ended, every pool is idle, no socket was left open.
    assert report["leaks"] == {"found": False, "details": []}
    pools = report["upstream"]["pool_counters"]
    assert len(pools) == 2 * 3, pools  # main, ronei and mini of each worker
    assert setup["children_exit"] == {"probe": 0, "server": 0, "simulator": 0}
    assert "the server (2 workers)" in err

    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert setup["redis_prefix"].startswith("carlos-loadtest-")
        assert list(client.scan_iter(f"{setup['redis_prefix']}:*")) == []  # its keys deleted
    finally:
        client.close()
    assert leftovers(tmp_path) == []
