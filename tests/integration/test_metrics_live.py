"""The control plane's /metrics after a real run with a crash in it."""

from __future__ import annotations

import re
import urllib.request

from intentd.client import IntentClient, IntentState
from tests.stack import TYPE
from tests.support import free_port, wait_until


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+|NaN)$", line)
        if match:
            values[match[1]] = float(match[2])
    return values


def test_metrics_show_sends_deliveries_redeliveries_steps_and_latency(cluster) -> None:
    port = free_port()
    server = cluster.server(INTENTD_METRICS_LISTEN=f"127.0.0.1:{port}")
    cluster.sidecar(server.address)
    with IntentClient(server.address) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=cluster.address,
                                       payload={"steps": 4, "crash_at": 3})
        assert client.wait_for(intent_id, timeout=60).state is IntentState.COMPLETED
        # One that nobody serves stays PENDING: the live-intents gauge counts it.
        client.send_intent(intent_type=TYPE, to_agent="agent://nobody/serves/this", payload={})
    url = f"http://127.0.0.1:{port}/metrics"
    # The intents gauge is refreshed by a background count, not at scrape time.
    m = wait_until(lambda: (lambda v: v if any(k.startswith("intentd_intents{") for k in v) else None)(scrape(url)),
                   10, 0.1, "the intent counts")
    assert m['intentd_sends_total{result="created"}'] >= 1
    assert m["intentd_deliveries_total"] >= 2
    assert m['intentd_redeliveries_total{cause="agent_died"}'] >= 1
    assert m["intentd_steps_recorded_total"] >= 4
    assert m['intentd_writes_total{code="OK",op="complete"}'] >= 1
    assert m["intentd_dispatch_latency_seconds_count"] >= 2
    assert m['intentd_end_to_end_latency_seconds_count{state="COMPLETED"}'] >= 1
    assert m["intentd_connected_sidecars"] == 1
    assert m["intentd_db_pool_size"] >= 1
    assert any(k.startswith("intentd_sweeper_lag_seconds") for k in m), sorted(m)
    assert m['intentd_notifications_total{channel="events"}'] >= 1
    assert any(k.startswith("intentd_intents{") for k in m)
