"""The suite: configuration, the scenario registry and the run loop."""

from __future__ import annotations

import asyncio
import importlib
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.machine import cpu_idle_fraction, loadavg
from bench.report import Figure, Report


@dataclass(frozen=True)
class Config:
    quick: bool = False
    full: bool = False
    peers: bool = True
    profile: bool = False
    reps: int = 3
    # No scenario starts after this many seconds (the rest are skipped).
    budget_s: float = 500.0
    # limits: seconds per measurement
    limit_seconds: float = 1.5
    # e2e: intents per measured pass; a pass is also capped to about
    # e2e_pass_s seconds at the rate the warm-up measured (see e2e.py).
    e2e_n: int = 20_000
    e2e_pass_s: float = 12.0
    e2e_sidecars: int = 4
    e2e_capacity: int = 50
    e2e_batch: int = 500
    e2e_in_flight: int = 64
    # steps
    seq_steps: int = 1000
    conc_intents: int = 200
    conc_steps: int = 10
    # latency
    latency_n: int = 200
    # recovery
    kills: int = 20
    # scale
    scale_terminal: int = 1_000_000
    scale_pending: int = 50_000
    scale_latency_n: int = 100
    scale_streams: int = 500
    # peers
    peer_jobs: int = 5000

    @classmethod
    def make(cls, *, quick: bool, full: bool, peers: bool, profile: bool, reps: int | None,
             e2e_n: int | None, budget_s: float | None = None) -> Config:
        if quick:
            base = cls(quick=True, full=full, peers=peers, profile=profile, reps=2, budget_s=95.0,
                       limit_seconds=0.5,
                       e2e_n=2000, e2e_pass_s=3.0, seq_steps=300, conc_intents=50, latency_n=50, kills=3,
                       scale_terminal=100_000, scale_pending=5000, scale_latency_n=30, scale_streams=100,
                       peer_jobs=1000)
        else:
            base = cls(full=full, peers=peers, profile=profile)
        changes: dict[str, Any] = {}
        if reps is not None:
            changes["reps"] = reps
        if budget_s is not None:
            changes["budget_s"] = budget_s or float("inf")
        if e2e_n is not None:
            changes["e2e_n"] = e2e_n
            changes["e2e_pass_s"] = 1e9  # an explicit N is used as given
        return cls(**{**asdict(base), **changes})


@dataclass
class Run:
    config: Config
    report: Report = field(default_factory=Report)

    def figure(self, key: str, label: str, unit: str, samples: list[float], **kw: Any) -> Figure:
        return self.report.add(Figure(key, label, unit, [float(s) for s in samples], **kw))

    def note(self, scenario: str, **info: Any) -> None:
        self.report.scenarios.setdefault(scenario, {}).update(info)


@dataclass(frozen=True)
class Scenario:
    name: str
    module: str
    title: str
    needs: tuple[str, ...] = ()

    def entry(self) -> Callable[[Run], Awaitable[None]]:
        module = importlib.import_module(self.module)
        fn: Callable[[Run], Awaitable[None]] = module.run
        return fn


SCENARIOS = [
    Scenario("limits", "bench.limits", "1. Physical limits (baselines)"),
    Scenario("e2e", "bench.e2e", "2. End-to-end throughput", ("limits",)),
    Scenario("steps", "bench.steps", "3. Step recording cost", ("limits",)),
    Scenario("latency", "bench.latency", "4. Latency on an idle system", ("limits",)),
    Scenario("recovery", "bench.recovery", "5. Recovery", ("limits",)),
    Scenario("scale", "bench.scale", "6. Scale", ()),
    Scenario("peers", "bench.peers", "7. Peers", ("limits", "e2e", "steps")),
    Scenario("waits", "bench.waits", "8. Durable waits", ()),
    Scenario("children", "bench.children", "9. Child intents", ()),
    Scenario("parallel", "bench.parallel", "10. Parallel steps", ()),
    Scenario("streams", "bench.streams", "11. Streams", ()),
]
BY_NAME = {s.name: s for s in SCENARIOS}


def plan(only: list[str] | None, peers: bool) -> list[Scenario]:
    """The scenarios to run, in suite order: the chosen ones and what their
    baselines need."""
    if not only:
        return [s for s in SCENARIOS if s.name != "peers" or peers]
    wanted: set[str] = set()

    def add(name: str) -> None:
        if name not in wanted:
            wanted.add(name)
            for dep in BY_NAME[name].needs:
                add(dep)

    for name in only:
        add(name)
    return [s for s in SCENARIOS if s.name in wanted]


async def run_all(run: Run, scenarios: list[Scenario], log: Callable[[str], None]) -> bool:
    ok = True
    start = time.monotonic()
    for scenario in scenarios:
        log(f"== {scenario.title}")
        if time.monotonic() - start > run.config.budget_s:
            run.note(scenario.name, status=f"skipped: the {run.config.budget_s:.0f}s budget was spent")
            log(f"   {scenario.name}: skipped (time budget spent; --budget 0 lifts it)")
            ok = False
            continue
        # Others' load on the machine skews everything: record it.
        idle = await asyncio.to_thread(cpu_idle_fraction, 0.3)
        run.note(scenario.name, cpu_idle_before=round(idle, 3), loadavg_before=loadavg())
        began = time.monotonic()
        try:
            await scenario.entry()(run)
            status = "ok"
        except Exception as exc:
            ok = False
            status = f"error: {type(exc).__name__}: {exc}"
            log(traceback.format_exc())
        seconds = time.monotonic() - began
        run.note(scenario.name, seconds=round(seconds, 1), status=status)
        log(f"   {scenario.name}: {status} in {seconds:.0f}s")
    return ok
