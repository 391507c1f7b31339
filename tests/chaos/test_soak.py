"""A short chaos soak in the normal suite: every fault kind at least once,
every invariant checked (see docs/chaos.md), with the hostile tenant (poison
writes, a sidecar that never reads, a write flood) beside the workload from
a third of the way in. Uses its own embedded PostgreSQL, since restarting
PostgreSQL is one of the faults."""

from __future__ import annotations

import shlex

import pytest

from intentd.commands.chaos import FAULT_KINDS, SoakConfig, run_soak
from intentd.commands.chaos.config import config_from_args

# Two minutes on two cores; the hard deadline inside the harness is longer,
# this only stops pytest from waiting forever on a harness bug.
pytestmark = pytest.mark.timeout(420)


# The command line docs/chaos.md gives for the short soak. Rates are bounded
# so the run stays within its time on two cores: the long soak turns them up.
SHORT = (
    "--intents 60 --steps 8 --duration 60 --seed 20261127 --sidecars 5 --step-ms 100,300"
    " --fault-rate 0.3 --replicas 3 --addresses 2 --capacity 4 --clients 12 --heartbeat-ms 2000 --ping-ms 250"
    " --sweep-s 0.1 --drain-timeout 90 --quiet --hostile --poison-rate 100 --flood-rate 200"
    " --silent-repeats 600 --silent-step-kib 100"
)


def short_config() -> SoakConfig:
    return config_from_args(shlex.split(SHORT))


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
