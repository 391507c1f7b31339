"""Process management, databases, timing and statistics shared by the scenarios.

Everything a scenario starts goes through :class:`Proc`, which puts each
process in its own process group and registers it, so :func:`kill_all` (run
by ``python -m bench`` in a ``finally``) leaves nothing behind, even after an
error or Ctrl-C. Every database is a fresh ``bench_*`` database dropped at the
end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

import grpc

from intentd.core.aio import serving
from intentd.testing.database import connection, with_database
from intentd.testing.processes import ChildProcess

ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
LOG_DIR = Path(tempfile.mkdtemp(prefix="intentd-bench-"))
NOOP_AGENT = f"{sys.executable} -m bench.agents.noop"

# ---------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in 0..100."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def iqr(values: Sequence[float]) -> tuple[float, float]:
    return percentile(values, 25), percentile(values, 75)


# ---------------------------------------------------------------- processes

_LIVE: set[Proc] = set()


class Proc(ChildProcess):
    """A child process in its own process group, output to a log file, killed
    by :func:`kill_all` if the scenario did not."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        super().__init__(LOG_DIR / f"{name}-{uuid.uuid4().hex[:6]}.log")
        self.name = name
        self.argv = list(argv)
        self.env = {"PYTHONPATH": str(ROOT), **(env or {})}

    def start(self) -> Self:
        self.launch(self.argv, self.env, cwd=ROOT)
        _LIVE.add(self)
        return self

    def kill_group(self) -> None:
        super().kill_group()
        _LIVE.discard(self)

    async def wait_log(self, *needles: str, count: int = 1, timeout: float = 60.0) -> None:
        """Waits until every needle appears ``count`` times in the log."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            if all(text.count(n) >= count for n in needles):
                return
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n{text[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no {needles!r} after {timeout}s:\n{text[-3000:]}")
            await asyncio.sleep(0.05)


def kill_all() -> None:
    for proc in list(_LIVE):
        proc.kill_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    return sum(cpu_times(pid))


# ---------------------------------------------------------------- intentd processes


class Server(Proc):
    """``python -m intentd.commands server`` on a free loopback port."""

    def __init__(self, database_url: str, **env: str) -> None:
        self.port = free_port()
        super().__init__("server", [sys.executable, "-m", "intentd.commands", "server"], {
            "INTENTD_DATABASE_URL": database_url,
            "INTENTD_LISTEN": f"127.0.0.1:{self.port}",
            "INTENTD_SHUTDOWN_GRACE_S": "1",
            # Sidecars and clients have no API-key support yet; with a
            # database URL the server would require keys ("auto").
            "INTENTD_AUTH": "off",
            **env,
        })

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def ready(self, timeout: float = 60.0) -> Server:
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(serving, self.address):
            if not self.alive():
                raise RuntimeError(f"server exited:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not healthy after {timeout}s:\n{self.log_tail()}")
            await asyncio.sleep(0.1)
        return self


class Sidecar(Proc):
    """``python -m intentd.commands sidecar``, optionally supervising an agent command."""

    def __init__(self, server: str, address: str, capacity: int, agent: str | None = NOOP_AGENT,
                 agent_capacity: int | None = None, env: dict[str, str] | None = None) -> None:
        self.socket = f"/tmp/intentd-bench-{uuid.uuid4().hex[:10]}.sock"
        argv = [sys.executable, "-m", "intentd.commands", "sidecar", "--server", server, "--address", address,
                "--capacity", str(capacity), "--listen", f"unix://{self.socket}"]
        if agent:
            argv += ["--exec", agent]
        super().__init__("sidecar", argv, {
            "BENCH_AGENT_ADDRESS": address,
            "BENCH_AGENT_CAPACITY": str(agent_capacity or capacity),
            "INTENTD_LOG_LEVEL": "INFO",
            **(env or {}),
        })

    @property
    def runtime_address(self) -> str:
        return f"unix://{self.socket}"

    async def ready(self, agents: int = 1, timeout: float = 60.0) -> Sidecar:
        """Registered upstream and ``agents`` agents attached (in total, ever)."""
        await self.wait_log("registered with", timeout=timeout)
        if agents:
            await self.wait_log("attached (python", count=agents, timeout=timeout)
        return self

    def kill_group(self) -> None:
        super().kill_group()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)


def agent_proc(sidecar: Sidecar, address: str, capacity: int, **env: str) -> Proc:
    """A bench agent process attached to ``sidecar`` directly (not supervised by it)."""
    return Proc("agent", NOOP_AGENT.split(), {
        "INTENTD_SIDECAR_ADDRESS": sidecar.runtime_address,
        "BENCH_AGENT_ADDRESS": address,
        "BENCH_AGENT_CAPACITY": str(capacity),
        **env,
    })


# ---------------------------------------------------------------- databases


@contextlib.asynccontextmanager
async def fresh_database(tag: str) -> AsyncIterator[str]:
    """A new, empty database ``bench_<tag>_<random>``, dropped afterwards."""
    name = f"bench_{tag}_{uuid.uuid4().hex[:8]}"
    async with connection(ADMIN_URL) as admin:
        await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(ADMIN_URL, name)
    finally:
        async with connection(ADMIN_URL) as admin:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def xact_commits(url: str) -> int:
    """pg_stat_database.xact_commit of the database named by ``url``, read
    from the admin database so that the read itself is not counted."""
    name = urlsplit(url).path.lstrip("/")
    async with connection(ADMIN_URL) as admin:
        value = await admin.fetchval("SELECT xact_commit FROM pg_stat_database WHERE datname = $1", name)
    return int(value or 0)


# A backend publishes its counters at most once a second, and an idle one
# only after 10 s (PGSTAT_IDLE_INTERVAL); asyncpg pools reuse the most recent
# connection, so most of a pool is idle once a run ends. Counters are read
# after that long a pause to be exact.
STATS_SETTLE_S = 11.0


@dataclass
class CommitMeter:
    """Commits in one database between two reads, minus the bench's own
    transactions in it (``own``)."""

    url: str
    last: int = 0
    own: int = 0

    async def mark(self, settle: float = STATS_SETTLE_S) -> int:
        """Waits for the counters to settle; returns commits since the last mark."""
        await asyncio.sleep(settle)
        now = await xact_commits(self.url)
        delta = now - self.last - self.own
        self.last, self.own = now, 0
        return delta


async def backend_pids(url: str) -> list[int]:
    name = urlsplit(url).path.lstrip("/")
    async with connection(ADMIN_URL) as admin:
        rows = await admin.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", name)
    return [int(r["pid"]) for r in rows]


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(x) for x in (task / "children").read_text().split()]
    return out


def _cpu(pids: Sequence[int]) -> tuple[float, float]:
    user = system = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            u, s = cpu_times(pid)
            user += u
            system += s
    return user, system


def _machine_busy() -> float:
    """CPU seconds all processes of the machine used so far (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuMeter:
    """CPU seconds by component (server, sidecars, agents, PostgreSQL backends
    of the database, this bench process) between ``start`` and ``stop``, and
    of the whole machine ("machine": others' load shows as the difference)."""

    url: str
    server: int
    sidecars: list[int]
    before: dict[str, float] = field(default_factory=dict)
    began: float = 0.0

    async def _sample(self) -> dict[str, float]:
        agents = [c for s in self.sidecars for c in children(s)]
        times = os.times()
        parts = {
            "server": _cpu([self.server]),
            "sidecars": _cpu(self.sidecars),
            "agents": _cpu(agents),
            "postgres": _cpu(await backend_pids(self.url)),
            "bench client": (times.user, times.system),
        }
        out = {name: u + s for name, (u, s) in parts.items()}
        out.update({f"{name} (kernel)": s for name, (_, s) in parts.items()})
        out["machine"] = _machine_busy()
        return out

    async def start(self) -> None:
        self.before = await self._sample()
        self.began = time.monotonic()

    async def stop(self) -> dict[str, float]:
        """CPU seconds per component (and the kernel part of each) and the wall time."""
        after = await self._sample()
        out = {k: round(after[k] - self.before.get(k, 0.0), 3) for k in after}
        out["wall"] = round(time.monotonic() - self.began, 3)
        return out


# ---------------------------------------------------------------- a running cluster


@dataclass
class Cluster:
    """One server and its sidecars; stopped (groups killed) by ``close``."""

    server: Server
    sidecars: list[Sidecar] = field(default_factory=list)
    others: list[Proc] = field(default_factory=list)

    def close(self) -> None:
        for proc in [*self.others, *self.sidecars]:
            proc.kill_group()
        self.server.stop(grace=3.0)


async def start_cluster(db_url: str, address: str, sidecars: int, capacity: int,
                        server_env: dict[str, str] | None = None) -> Cluster:
    server = Server(db_url, **(server_env or {})).start()
    cluster = Cluster(server)
    try:
        await server.ready()
        cluster.sidecars = [Sidecar(server.address, address, capacity).start() for _ in range(sidecars)]
        await asyncio.gather(*(s.ready() for s in cluster.sidecars))
    except BaseException:
        cluster.close()
        raise
    return cluster


async def put_intent_type(server: str, intent_type: str, *, max_attempts: int, heartbeat_timeout_ms: int) -> None:
    from intentd.generated.v1 import admin_service_pb2, admin_service_pb2_grpc

    async with grpc.aio.insecure_channel(server) as channel:
        await admin_service_pb2_grpc.AdminServiceStub(channel).PutIntentType(admin_service_pb2.PutIntentTypeRequest(
            intent_type=admin_service_pb2.IntentType(intent_type=intent_type, max_attempts=max_attempts,
                                                     heartbeat_timeout_ms=heartbeat_timeout_ms)), timeout=10)

