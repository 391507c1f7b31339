"""``run_soak(config) -> Report``: one bounded chaos run, start to finish.

1. PostgreSQL (embedded and owned by the run, or the one given), a fresh
   database with the ledger tables;
2. the replicas (each on a fixed port, with its own INTENTD_INSTANCE_NAME),
   then the sidecars (several per agent address, each pointed at every
   replica, each supervising a chaos agent);
3. the workload's client threads send and wait; meanwhile the injector
   injects faults for at most ``duration`` seconds;
4. everything is healed, intents drain, every process is killed;
5. the invariants are checked against the database and the client answers.

Whatever happens, every process the run started is killed in ``finally`` and
a watchdog kills them when the hard deadline passes.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path

from .checks import check, snapshot
from .cluster import ManagedProcess, Postgres, Replica, Sidecar, free_port, start_reaper
from .config import FAULT_KINDS, SoakConfig
from .db import SyncDb
from .faults import FaultInjector
from .model import LEDGER_DDL
from .report import Report
from .workload import Workload, make_plans

STARTUP_TIMEOUT_S = 90.0
NORMAL_TENANT = "default"
HOSTILE_TENANT = "hostile"


def make_keys(url: str, run_tag: str) -> dict[str, str]:
    """The keys of the two tenants: the normal one's client and agents (its
    soak addresses only, where they may also start children), the hostile
    one's client and agents (its own).
    Made as ``intentd keys create`` does, straight in the database (which
    this also migrates), before any replica or gRPC thread exists."""
    import asyncio

    from intentd.server.auth import KeyStore
    from intentd.server.db import Database

    async def make() -> dict[str, str]:
        db = Database(url, min_size=1, max_size=1, application_name="intentd-chaos-keys")
        await db.open()
        try:
            store = KeyStore(db)
            keys = {}
            for name, tenant, role, pattern in (
                    ("normal-client", NORMAL_TENANT, "client", None),
                    ("normal-agent", NORMAL_TENANT, "agent", f"agent://chaos/soak{run_tag}/*"),
                    ("hostile-client", HOSTILE_TENANT, "client", None),
                    ("hostile-agent", HOSTILE_TENANT, "agent", f"agent://hostile/h{run_tag}/*")):
                # An agent starts its children on the addresses it serves ("family" intents).
                _, keys[name] = await store.create(tenant, name, [role], [pattern] if pattern else [],
                                                   send_patterns=[pattern] if pattern else [])
            return keys
        finally:
            await db.close()

    return asyncio.run(make())


class Hostile(ManagedProcess):
    """One actor of the hostile tenant (intentd/chaos/hostile.py)."""

    def __init__(self, mode: str, server: str, address: str, keys: dict[str, str], cfg: SoakConfig,
                 log_dir: Path) -> None:
        self.mode = mode
        self.summary = log_dir / f"hostile-{mode}.json"
        rate = cfg.flood_rate if mode == "flood" else cfg.poison_rate
        args = ["--mode", mode, "--server", server, "--address", address, "--agent-key", keys["hostile-agent"],
                "--client-key", keys["hostile-client"], "--rate", str(rate), "--repeats", str(cfg.silent_repeats),
                "--step-kib", str(cfg.silent_step_kib), "--summary", str(self.summary), "--seed", str(cfg.seed)]
        super().__init__(f"hostile-{mode}", args, {}, log_dir / f"hostile-{mode}.log",
                         module="intentd.commands.chaos.hostile")

    def read_summary(self) -> dict[str, object]:
        try:
            data: dict[str, object] = json.loads(self.summary.read_text())
            return data
        except (OSError, ValueError):
            return {"mode": self.mode, "missing": True}


class _Watchdog:
    """Kills every process of the run when the hard deadline passes (from its
    own thread: killing needs no fork)."""

    def __init__(self, seconds: float, procs: Callable[[], list[ManagedProcess]], say: Callable[[str], None]) -> None:
        self.fired = threading.Event()
        self._done = threading.Event()
        self._procs = procs
        self._say = say
        self._thread = threading.Thread(target=self._run, args=(seconds,), name="chaos-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self, seconds: float) -> None:
        if self._done.wait(seconds):
            return
        self.fired.set()
        self._say(f"! hard deadline of {seconds:.0f}s passed: killing everything")
        for proc in self._procs():
            proc.signal_group(signal.SIGKILL)

    def cancel(self) -> None:
        self._done.set()


def run_soak(cfg: SoakConfig) -> Report:
    cfg.validate()
    began = time.monotonic()
    run_tag = uuid.uuid4().hex[:6]
    report = Report(seed=cfg.seed)
    report.intents_planned = cfg.intents
    report.settings = (
        f"{cfg.intents} intents x {cfg.steps} steps, {cfg.replicas} replicas, {cfg.sidecars} sidecars on "
        f"{cfg.addresses} addresses (capacity {cfg.capacity}), faults {cfg.fault_rate}/s for at most "
        f"{cfg.duration:.0f}s, heartbeat {cfg.heartbeat_ms}ms, ping {cfg.ping_ms}ms, "
        f"max_attempts {cfg.max_attempts}, step {cfg.step_ms[0]}-{cfg.step_ms[1]}ms, {cfg.client_threads} clients"
    )
    if cfg.work_dir is not None:
        work_dir = cfg.work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
    else:
        work_dir = Path(tempfile.mkdtemp(prefix="intentd-chaos-"))
    lock = threading.Lock()

    def say(text: str) -> None:
        if cfg.verbose:
            with lock:
                print(text, flush=True)

    pg = Postgres(cfg.database_url, cfg.pg_data_dir, cfg.pg_ctl, cfg.pg_user, work_dir, cfg.keep_database)
    replicas: list[Replica] = []
    sidecars: list[Sidecar] = []
    hostiles: list[Hostile] = []
    watchdog = _Watchdog(cfg.hard_deadline_s(), lambda: [*replicas, *sidecars, *hostiles], say)
    watchdog.start()
    db: SyncDb | None = None
    reaper: subprocess.Popen[bytes] | None = None
    workload: Workload | None = None
    injector: FaultInjector | None = None
    harness_errors: list[str] = []
    try:
        say(f"chaos soak seed {cfg.seed}: {report.settings}")
        say(f"logs in {work_dir}")
        pg.start()
        # If the harness is SIGKILLed, its children die with it; PostgreSQL
        # (a daemon) and the sockets are left to this reaper.
        sockets = f"{tempfile.gettempdir()}/ic-{run_tag}-*.sock"
        if pg.embedded and pg.temp_dir is not None:
            reaper = start_reaper([*pg.pg_ctl_argv(30), "stop", "-m", "immediate"], [sockets, pg.temp_dir])
        else:
            reaper = start_reaper(["true"], [sockets])
        db = SyncDb(pg.url)
        db.execute(LEDGER_DDL)
        if not pg.restartable:
            say("PostgreSQL faults disabled (no data directory: pass --pg-data-dir)")
            report.notes.append("PostgreSQL faults (pg_restart, pg_outage) disabled: no --pg-data-dir")

        keys = make_keys(pg.url, run_tag) if cfg.hostile else {}
        replica_env = {
            "INTENTD_HEARTBEAT_TIMEOUT_MS": str(cfg.heartbeat_ms),
            "INTENTD_PING_INTERVAL_MS": str(cfg.ping_ms),
            "INTENTD_ACK_TIMEOUT_MS": str(cfg.ack_timeout_ms),
            "INTENTD_SWEEP_INTERVAL_S": str(cfg.sweep_s),
            "INTENTD_DISPATCH_CATCHUP_S": "0.5",
            "INTENTD_SHUTDOWN_GRACE_S": "1",
            "INTENTD_POOL_MIN_SIZE": "2",
            "INTENTD_POOL_MAX_SIZE": "8",
            "INTENTD_LOG_LEVEL": cfg.log_level,
            # Loopback only; with a database URL authentication would default to on.
            # The hostile tenant needs it: tenants are real only with keys.
            "INTENTD_AUTH": "on" if cfg.hostile else "off",
        }
        replicas.extend(Replica(i + 1, free_port(), pg.url, replica_env, work_dir) for i in range(cfg.replicas))
        # The first one migrates the schema; the others start together.
        for group in (replicas[:1], replicas[1:]):
            for replica in group:
                replica.spawn()
            for replica in group:
                if not replica.wait_healthy(STARTUP_TIMEOUT_S, watchdog.fired.is_set):
                    raise RuntimeError(f"{replica.name} did not start:\n{replica.log_tail()}")
        servers = ",".join(r.address for r in replicas)
        addresses = [f"agent://chaos/soak{run_tag}/a{i}" for i in range(cfg.addresses)]
        sidecar_env = {
            "CHAOS_DB_URL": pg.url,
            "INTENTD_LOG_LEVEL": cfg.log_level,
            "CHAOS_AGENT_LOG_LEVEL": cfg.log_level,
            "INTENTD_RECONNECT_MAX_BACKOFF_S": "1.0",
            "INTENTD_AGENT_STOP_GRACE_S": "1",
            **({"INTENTD_API_KEY": keys["normal-agent"]} if cfg.hostile else {}),
        }
        sidecars.extend(
            Sidecar(i + 1, addresses[i % len(addresses)], servers, sidecar_env, work_dir, run_tag, cfg.capacity)
            for i in range(cfg.sidecars))
        for sidecar in sidecars:
            sidecar.spawn()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not all(s.agent_pid() for s in sidecars):
            dead = [s for s in sidecars if not s.alive()]
            if dead or time.monotonic() > deadline or watchdog.fired.is_set():
                names = ", ".join(s.name for s in (dead or sidecars))
                raise RuntimeError(f"sidecars did not start ({names}):\n{(dead or sidecars)[0].log_tail()}")
            time.sleep(0.1)
        say(f"up in {time.monotonic() - began:.1f}s: {len(replicas)} replicas ({servers}), "
            f"{len(sidecars)} sidecars on {len(addresses)} addresses")

        plans = make_plans(cfg, addresses, run_tag)
        target = "ipv4:" + ",".join(r.address for r in replicas)
        start = time.monotonic()
        wait_deadline = start + max(cfg.duration, cfg.window) + cfg.drain_timeout
        metadata = [("authorization", f"Bearer {keys['normal-client']}")] if cfg.hostile else []
        workload = Workload(cfg, target, plans, f"chaos-{run_tag}", wait_deadline, metadata)
        injector = FaultInjector(cfg, pg, replicas, sidecars, db, say, watchdog.fired.is_set)
        say(f"faults: {', '.join(injector.kinds) or 'none'}")
        if cfg.hostile:
            for i, mode in enumerate(("poison", "silent", "flood")):
                hostiles.append(Hostile(mode, replicas[i % len(replicas)].address,
                                        f"agent://hostile/h{run_tag}/{mode}", keys, cfg, work_dir))

            def unleash() -> None:
                report.hostile_started_at = time.time()
                say(f"  {time.strftime('%H:%M:%S')} hostile tenant starts: "
                    + ", ".join(f"{h.mode} -> {h.args[3]}" for h in hostiles))
                for hostile in hostiles:
                    hostile.spawn()

            injector.scheduled.append((start + cfg.hostile_start, unleash))
        workload.start()
        injector.run(until=start + cfg.duration, done=workload.done)
        report.fault_window_s = time.monotonic() - start
        injector.heal()
        drain_began = time.monotonic()
        say(f"faults over after {report.fault_window_s:.1f}s; waiting for "
            f"{len(plans) - workload.finished} intents to finish")
        while not workload.done() and time.monotonic() < wait_deadline and not watchdog.fired.is_set():
            injector.tend()
            time.sleep(0.2)
        # A parent that ended leaves its live children to the sweeper's
        # cascade: give it time before everything stops (bounded).
        if not _children_settled(db, min(wait_deadline, time.monotonic() + CASCADE_TIMEOUT_S),
                                 watchdog.fired.is_set):
            say("! live children of ended parents were not canceled in time")
        report.drain_s = time.monotonic() - drain_began
        workload.stop()
        if not workload.join(30):
            harness_errors.append("client threads did not finish")
        say(f"workload over after {report.drain_s:.1f}s of drain; stopping every process")
        for proc in [*hostiles, *sidecars, *replicas]:
            proc.kill()
        report.hostile = [h.read_summary() for h in hostiles]
        report.replica_rss = dict(injector.rss)
        snap = snapshot(db, NORMAL_TENANT)
        harness_errors += workload.errors + injector.errors
        if watchdog.fired.is_set():
            harness_errors.append(f"hard deadline of {cfg.hard_deadline_s():.0f}s passed")
        exits = [f"{name} exited with code {code}: {_last_lines(tail)}" for name, code, tail in
                 injector.unexpected_exits]
        check(cfg, snap, workload.outcomes, injector.faults, report,
              {"unexpected_exits": exits, "harness_errors": harness_errors})
    except BaseException as exc:
        harness_errors.append(f"{type(exc).__name__}: {exc}")
        if cfg.verbose:
            traceback.print_exc()
        if not report.invariants:
            from .report import Invariant

            failed = Invariant("harness ran cleanly", checked=1)
            for message in harness_errors:
                failed.fail(message)
            report.invariants = [failed]
        if isinstance(exc, KeyboardInterrupt):
            raise
    finally:
        watchdog.cancel()
        if workload is not None:
            workload.stop()
        for proc in [*hostiles, *sidecars, *replicas]:
            with contextlib.suppress(Exception):
                proc.kill()
        for sidecar in sidecars:
            sidecar.cleanup()
        if injector is not None:
            report.faults = {k: sum(1 for f in injector.faults if f.kind == k) for k in FAULT_KINDS
                             if k in injector.kinds}
            report.faults_skipped = {k: v for k, v in injector.skipped.items() if v}
            report.fault_log = [f"{time.strftime('%H:%M:%S', time.localtime(f.at))} {f.kind} {f.target} {f.detail}"
                                for f in injector.faults]
        if db is not None:
            with contextlib.suppress(Exception):
                db.close()
        with contextlib.suppress(Exception):
            pg.close()
        if reaper is not None:
            reaper.kill()
            reaper.wait(10)
        report.elapsed_s = time.monotonic() - began
        if report.ok and not cfg.keep_logs and cfg.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
            report.work_dir = ""
        else:
            report.work_dir = str(work_dir)
    return report


CASCADE_TIMEOUT_S = 30.0
LIVE_ORPHANS = (
    "SELECT count(*) FROM intents k JOIN intents p ON p.id = k.parent_id"
    " WHERE k.tenant = $1 AND k.finish_time IS NULL AND p.finish_time IS NOT NULL AND NOT k.detached"
)


def _children_settled(db: SyncDb, deadline: float, stop: Callable[[], bool]) -> bool:
    """Waits until no child of an ended parent is live (the checker then
    sees what the cascade did; one still live fails "every intent terminal")."""
    while not stop():
        try:
            if db.fetchval(LIVE_ORPHANS, NORMAL_TENANT, timeout=10) == 0:
                return True
        except Exception:  # an outage's tail: keep asking until the deadline
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return False


def _last_lines(text: str, n: int = 3) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:])
