"""Three ``server.py`` nodes share a broker and PostgreSQL; one is killed with SIGKILL mid-stream.

30 clients, each given the three endpoints in a rotated order (10 start on each node),
subscribe to one topic and send ``KV_GET`` and ``ECHO`` in a loop while a publisher on the other
two nodes publishes a numbered stream; the first node is killed after a third of it. Every
client must be served again soon, every subscriber must get every message once and in order,
and no request may go unanswered; then the killed node, started again on its port, serves a new
client and replays the stream from the broker's history.

The scenario is ``bench/cluster.py``'s (its part (b) prints the same figures); this test asserts
on them, with a bound on recovery far above the measured one (tens of milliseconds) so that a
loaded machine does not fail it. Brokers at ``PYASYNC_NATS_URL`` / ``PYASYNC_REDIS_URL`` and
PostgreSQL at ``PYASYNC_PG_URL``: skipped with a reason when one is unreachable, failed instead
under ``PYASYNC_REQUIRE_DB=1``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from server_config import DatabaseSettings
from tests.db.test_messaging import URLS, require_broker
from tests.helpers import ROOT, require_reachable

sys.path.insert(0, str(ROOT / "bench"))

import cluster

log = logging.getLogger(__name__)

RECOVERY_BOUND = 5.0  # seconds; the target is 2 s, and about 0.03 s is measured here


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("broker", ["nats", "redis"])
async def test_a_killed_node_loses_no_message_and_no_request(broker: str, tmp_path: Path) -> None:
    require_broker(URLS[broker])
    await require_reachable(DatabaseSettings(db_url=cluster.PG_URL))
    plan = cluster.FailoverPlan()
    result = await cluster.failover(tmp_path, broker, plan)
    log.info("%s", result.summary())
    assert result.moved == plan.clients // 3, result  # the clients that started on node-0
    assert len(result.recovery_s) == result.moved, result
    assert result.recovery_max_s <= RECOVERY_BOUND, result.summary()
    assert result.all_served_s is not None and result.all_served_s <= RECOVERY_BOUND, result
    assert (result.published, result.publish_failed) == (plan.messages, 0), result
    assert (result.lost, result.duplicates, result.out_of_order) == (0, 0, 0), result
    assert (result.gaps, result.wrong_data) == (0, 0), result
    assert (result.unanswered, result.errors) == (0, []), result
    assert result.requests > plan.clients * 10, result  # every client kept asking throughout
    assert result.restarted_node_id == "node-0", result
    assert result.replayed_after_restart == plan.messages, result
    assert result.tracebacks == [], result
