"""A short chaos soak in the normal suite: every fault kind at least once,
every invariant checked (see docs/chaos.md), with the hostile tenant (poison
writes, a sidecar that never reads, a write flood) beside the workload from
a third of the way in. Uses its own embedded PostgreSQL, since restarting
PostgreSQL is one of the faults."""

from __future__ import annotations

import pytest

from intentd.commands.chaos import FAULT_KINDS, SoakConfig, run_soak

# Two minutes on two cores; the hard deadline inside the harness is longer,
# this only stops pytest from waiting forever on a harness bug.
pytestmark = pytest.mark.timeout(420)


def short_config() -> SoakConfig:
    return SoakConfig(
        intents=60,
        steps=8,
        duration=60,
        seed=20261127,
        fault_rate=0.3,
        sidecars=5,
        replicas=3,
        addresses=2,
        capacity=4,
        clients=12,
        step_ms=(100, 300),
        heartbeat_ms=2000,
        ping_ms=250,
        sweep_s=0.1,
        drain_timeout=90,
        verbose=False,
        hostile=True,
        # Bounded, so the run stays within its time on two cores: the long
        # soak (docs/chaos.md) turns them up.
        poison_rate=100.0,
        flood_rate=200.0,
        silent_repeats=600,
        silent_step_kib=100,
    )


def test_short_soak_keeps_every_invariant() -> None:
    report = run_soak(short_config())
    text = report.format()
    print(text)
    assert report.ok, text
    missing = [kind for kind in FAULT_KINDS if report.faults.get(kind, 0) < 1]
    assert not missing, f"fault kinds never injected: {missing}\n{text}"
    assert report.intents_in_db + report.sends_refused == report.intents_planned, text
    # The faults did bite: agents and sidecars died holding work, and it moved on.
    assert report.redeliveries > 0, text
    # The hostile tenant attacked (its invariant checks each actor wrote and
    # was answered only with client errors), and the normal tenant's step
    # latency is reported before and with it.
    assert {a["mode"] for a in report.hostile} == {"poison", "silent", "flood"}, text
    names = [lat.name for lat in report.latencies if lat.samples]
    assert any("before the hostile tenant" in n for n in names) and any("with the hostile" in n for n in names), text
