"""The fault injector: at seeded random times, one fault of a seeded random
kind, against a seeded random target. Runs in the harness's main thread (it
spawns replacements, and every process must be forked by one thread)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .cluster import Postgres, Replica, Sidecar
from .config import FAULT_KINDS, SoakConfig
from .db import SyncDb

# The intents an agent process works on (its current lease started there).
HELD_BY_PID = """
SELECT i.id, i.attempt FROM intents i
JOIN chaos_attempts a ON a.lease_token = i.lease_token AND a.intent_id = i.id
WHERE a.pid = $1 AND i.state IN ('DELIVERED', 'IN_PROGRESS')
"""
# ...and those of them with a step running now (its side effect written, not yet recorded).
MID_STEP_BY_PID = """
SELECT DISTINCT l.intent_id FROM chaos_ledger l
JOIN intents i ON i.id = l.intent_id AND i.lease_token = l.lease_token
WHERE l.pid = $1 AND i.state = 'IN_PROGRESS' AND i.steps_completed < l.step
"""


@dataclass
class Fault:
    kind: str
    at: float  # wall clock (time.time()) of the injection
    target: str
    detail: str = ""
    # (intent id, attempt) the victim was working on when it died or froze.
    affected: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class Stopped:
    sidecar: Sidecar
    until: float  # monotonic


@dataclass(eq=False)
class FaultInjector:
    cfg: SoakConfig
    pg: Postgres
    replicas: list[Replica]
    sidecars: list[Sidecar]
    db: SyncDb
    say: Callable[[str], None]
    abort: Callable[[], bool]
    faults: list[Fault] = field(default_factory=list, init=False)
    stopped: list[Stopped] = field(default_factory=list, init=False)
    pg_down: bool = field(default=False, init=False)
    # Processes that exited without being killed by us: (name, exit code, log tail).
    unexpected_exits: list[tuple[str, int | None, str]] = field(default_factory=list, init=False)
    errors: list[str] = field(default_factory=list, init=False)
    # (monotonic time, what to do): run by tend() on the harness's thread,
    # the one every process must be spawned from (PR_SET_PDEATHSIG).
    scheduled: list[tuple[float, Callable[[], None]]] = field(default_factory=list, init=False)
    # Resident memory of each replica slot: first sample and peak, in bytes.
    rss: dict[str, tuple[int, int]] = field(default_factory=dict, init=False)
    _rss_at: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.cfg.seed)
        self.kinds = self.cfg.enabled_kinds(self.pg.restartable)
        self.weights = [self.cfg.weights[k] for k in self.kinds]
        forced = list(self.kinds) if self.cfg.force_all_kinds else []
        self.rng.shuffle(forced)
        self.forced = forced
        self.skipped: dict[str, int] = dict.fromkeys(FAULT_KINDS, 0)

    # ------------------------------------------------------------ the loop

    def run(self, until: float, done: Callable[[], bool]) -> None:
        """Injects faults until the monotonic time ``until`` or ``done()``
        (every intent finished), whichever comes first. The forced kinds
        (each enabled kind once) come first, closer together; a kind that
        found no target (no agent mid-step, no busy sidecar) is tried again."""
        if not self.kinds or self.cfg.fault_rate <= 0:
            self._idle(until, done)
            return
        forced_gap = min(1.0 / self.cfg.fault_rate, 0.4 * self.cfg.duration / max(1, len(self.forced)))
        while not self.abort():
            mean = forced_gap if self.forced else 1.0 / self.cfg.fault_rate
            gap = min(3 * mean, max(0.2, self.rng.expovariate(1.0 / mean)))
            if not self._sleep(gap, until, done):
                break
            kind = self.forced[0] if self.forced else self.rng.choices(self.kinds, self.weights)[0]
            try:
                fault = self.inject(kind)
            except Exception as exc:  # a harness problem, not a product one: report it
                self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                self.say(f"  ! {kind} failed: {type(exc).__name__}: {exc}")
                fault = None
            if fault is None:
                self.skipped[kind] += 1
                continue
            if self.forced and self.forced[0] == kind:
                self.forced.pop(0)
            self.faults.append(fault)
            self.say(f"  {time.strftime('%H:%M:%S')} {fault.kind:<13} {fault.target:<12} {fault.detail}")

    def _idle(self, until: float, done: Callable[[], bool]) -> None:
        while time.monotonic() < until and not done() and not self.abort():
            self.tend()
            time.sleep(0.1)

    def _sleep(self, seconds: float, until: float, done: Callable[[], bool]) -> bool:
        """Sleeps, tending processes meanwhile; False when the window is over."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.abort() or time.monotonic() >= until or done():
                return False
            self.tend()
            time.sleep(0.05)
        return time.monotonic() < until and not done()

    # ------------------------------------------------------------ upkeep

    def tend(self) -> None:
        """Resumes frozen sidecars whose time is up; restarts processes that
        died without being killed (and records that)."""
        self.tend_without_db()
        procs: list[Replica | Sidecar] = [*self.replicas, *self.sidecars]
        for proc in procs:
            code = proc.returncode()
            if code is not None and not proc.killed:
                self.unexpected_exits.append((proc.name, code, proc.log_tail()))
                self.say(f"  ! {proc.name} exited on its own (code {code}); restarting it")
                proc.killed = True
                self._respawn(proc)

    def sample_rss(self) -> None:
        for replica in self.replicas:
            if not replica.alive():
                continue
            try:
                with open(f"/proc/{replica.pid}/status") as f:
                    line = next(x for x in f if x.startswith("VmRSS:"))
            except (OSError, StopIteration):
                continue
            rss = int(line.split()[1]) * 1024
            first, peak = self.rss.get(replica.name, (rss, 0))
            self.rss[replica.name] = (first, max(peak, rss))

    def heal(self) -> None:
        """After the fault window: everything running again."""
        for entry in self.stopped:
            entry.sidecar.signal_group(signal.SIGCONT)
        self.stopped.clear()
        self._pg(self.pg.ensure_running)
        self.pg_down = False
        self.tend()

    def _respawn(self, proc: Replica | Sidecar) -> None:
        if isinstance(proc, Sidecar):
            proc.kill()
            proc.cleanup()
            proc.spawn()
        else:
            proc.kill()
            proc.spawn()
            if not proc.wait_healthy(60, self.abort):
                self.errors.append(f"{proc.name} did not become healthy after a restart")

    # ------------------------------------------------------------ faults

    def inject(self, kind: str) -> Fault | None:
        method: Callable[[], Fault | None] = getattr(self, f"_fault_{kind}")
        return method()

    def _live_sidecars(self) -> list[Sidecar]:
        frozen = {id(s.sidecar) for s in self.stopped}
        return [s for s in self.sidecars if s.alive() and id(s) not in frozen]

    def _held(self, pid: int | None) -> list[tuple[str, int]]:
        if pid is None:
            return []
        return [(r["id"], r["attempt"]) for r in self.db.fetch(HELD_BY_PID, pid, timeout=10)]

    def _fault_agent_kill(self) -> Fault | None:
        # Look for an agent in the middle of a step for up to 3 s.
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and not self.abort():
            candidates = self._live_sidecars()
            self.rng.shuffle(candidates)
            for sidecar in candidates:
                pid = sidecar.agent_pid()
                if pid is None:
                    continue
                mid = self.db.fetch(MID_STEP_BY_PID, pid, timeout=10)
                if not mid:
                    continue
                held = self._held(pid)
                at = time.time()
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                return Fault("agent_kill", at, sidecar.name, f"agent pid {pid}, {len(mid)} mid-step", held)
            time.sleep(0.1)
        return None

    def _fault_sidecar_kill(self) -> Fault | None:
        candidates = self._live_sidecars()
        if not candidates:
            return None
        busy = [s for s in candidates if self._held(s.agent_pid())]
        sidecar = self.rng.choice(busy or candidates)
        held = self._held(sidecar.agent_pid())
        at = time.time()
        sidecar.kill()
        sidecar.cleanup()
        sidecar.spawn()
        return Fault("sidecar_kill", at, sidecar.name, f"group killed holding {len(held)}; replacement started",
                     held)

    def _fault_sidecar_stop(self) -> Fault | None:
        candidates = self._live_sidecars()
        busy = [s for s in candidates if self._held(s.agent_pid())]
        if not busy:
            return None
        sidecar = self.rng.choice(busy)
        held = self._held(sidecar.agent_pid())
        seconds = self.cfg.heartbeat_ms / 1000 * self.rng.uniform(1.3, 2.0)
        at = time.time()
        sidecar.signal(signal.SIGSTOP)  # the sidecar only: its agent runs on, its writes hang
        self.stopped.append(Stopped(sidecar, time.monotonic() + seconds))
        return Fault("sidecar_stop", at, sidecar.name, f"SIGSTOP for {seconds:.1f}s holding {len(held)}", held)

    def _fault_replica_kill(self) -> Fault | None:
        replica = self.rng.choice(self.replicas)
        name = replica.instance_name
        at = time.time()
        replica.kill()
        replica.spawn()
        started = time.monotonic()
        healthy = replica.wait_healthy(60, self.abort)
        took = time.monotonic() - started
        if not healthy:
            self.errors.append(f"{replica.name} did not become healthy after replica_kill")
        return Fault("replica_kill", at, replica.name,
                     f"{name} killed; {replica.instance_name} serving after {took:.1f}s")

    def _fault_conn_drop(self) -> Fault | None:
        replica = self.rng.choice([r for r in self.replicas if r.alive()] or self.replicas)
        at = time.time()
        dropped = self.db.fetchval(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = $1) t", replica.application_name, timeout=10)
        return Fault("conn_drop", at, replica.name, f"{dropped} connections of {replica.application_name}")

    def _fault_pg_restart(self) -> Fault | None:
        mode = self.rng.choice(["fast", "immediate"])
        at = time.time()
        started = time.monotonic()
        try:
            self._pg(lambda: self.pg.restart(mode))
        finally:
            self._pg(self.pg.ensure_running)
        return Fault("pg_restart", at, "postgres", f"-m {mode}, {time.monotonic() - started:.1f}s")

    def _fault_pg_outage(self) -> Fault | None:
        mode = self.rng.choice(["fast", "immediate"])
        down = self.rng.uniform(0.5, 1.5) * self.cfg.heartbeat_ms / 1000
        at = time.time()
        self.pg_down = True
        try:
            self._pg(lambda: self.pg.stop(mode))
            end = time.monotonic() + down
            while time.monotonic() < end and not self.abort():
                self.tend_without_db()
                time.sleep(0.05)
        finally:
            # Whatever failed above, PostgreSQL must come back.
            self._pg(self.pg.ensure_running)
            self.pg_down = False
        return Fault("pg_outage", at, "postgres", f"stop -m {mode}, down {down:.1f}s")

    def tend_without_db(self) -> None:
        """Runs what is scheduled, samples memory and resumes frozen sidecars
        whose time is up: what tending may do while PostgreSQL is down."""
        now = time.monotonic()
        for due in [e for e in self.scheduled if e[0] <= now]:
            self.scheduled.remove(due)
            try:
                due[1]()
            except Exception as exc:
                self.errors.append(f"scheduled {due[1]}: {type(exc).__name__}: {exc}")
        if now - self._rss_at >= 1.0:
            self._rss_at = now
            self.sample_rss()
        for entry in list(self.stopped):
            if now >= entry.until:
                entry.sidecar.signal_group(signal.SIGCONT)
                self.stopped.remove(entry)

    @staticmethod
    def _pg(action: Callable[[], Any]) -> None:
        try:
            action()
        except subprocess.CalledProcessError as exc:
            stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else str(exc.stderr)
            raise RuntimeError(f"pg_ctl failed: {stderr.strip()}") from exc
