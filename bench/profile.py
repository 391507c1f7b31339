"""py-spy sampling of running processes, summarised as top frames.

``py-spy record --format raw`` writes collapsed stacks ("root;...;leaf
count"); without ``--idle`` it keeps only samples of threads that were
running, so the shares below are shares of CPU-busy samples.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench.harness import LOG_DIR, Proc

_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


class Profiler:
    def __init__(self, name: str, pid: int, *, subprocesses: bool = False, rate: int = 100,
                 native: bool = True) -> None:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        self.name = name
        self.path = LOG_DIR / f"profile-{name}.txt"
        argv = [exe, "record", "--pid", str(pid), "--format", "raw", "-o", str(self.path), "--rate", str(rate),
                "--duration", "3600"]
        # Native frames show what the C parts (uvloop, grpc core, asyncpg's
        # protocol) do; they need the process paused while sampled.
        argv.append("--native" if native else "--nonblocking")
        if subprocesses:
            argv.append("--subprocesses")
        self.proc = Proc(f"py-spy-{name}", argv)

    def start(self) -> Profiler:
        self.proc.start()
        return self

    async def stop(self) -> dict[str, Any]:
        self.proc.signal_group(signal.SIGINT)
        for _ in range(100):
            if not self.proc.alive():
                break
            await asyncio.sleep(0.1)
        self.proc.kill_group()
        return summarize(self.path)


_IDLE = frozenset({"epoll_wait", "epoll_pwait", "poll", "ppoll", "select", "pselect", "pselect6",
                   "pthread_cond_wait", "pthread_cond_timedwait", "__futex_abstimed_wait_common", "sem_wait",
                   "sem_timedwait", "nanosleep", "clock_nanosleep"})
_OWN_CODE = ("server/", "sidecar/", "agent/", "client/", "intentd/")
_ROOTS = ("intentd/cli.py", "intentd/__main__.py", "bench/agents/noop.py", "sidecar/app.py")


def _parse(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), ""
    file = m.group("file")
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/", "lib/python3.12/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return m.group("fn"), file


def _short(frame: str) -> str:
    fn, file = _parse(frame)
    return f"{fn} ({file})" if file else fn


def _layer(frame: str) -> str:
    file = _parse(frame)[1]
    if file.endswith(".py"):
        if file.startswith(_OWN_CODE):
            return "intentd Python code"
        if file.startswith(("asyncpg/", "grpc/", "google/")):
            return f"{file.split('/')[0]} Python code"
        if file.startswith("asyncio/"):
            return "asyncio Python code"
        return "other Python code"
    if "libc.so" in file:
        return "libc / system calls"
    if "cygrpc" in file or "grpc" in file:
        return "grpc core (C)"
    if file.startswith(("protocol.c", "pgproto.c", "record")) or "asyncpg" in file:
        return "asyncpg protocol (C)"
    if file.startswith(("loop.c", "core.c", "stream.c", "linux.c", "uv", "loop-watcher.c", "queue.h")) \
            or "uvloop" in file:
        return "uvloop / libuv (C)"
    return "CPython runtime (C)"


def summarize(path: Path, top: int = 15) -> dict[str, Any]:
    """Shares of the busy samples: by leaf frame (where the CPU is), by
    layer of the leaf, and inclusive for intentd's own functions (which calls
    the time is spent under). Samples whose leaf is a wait are idle."""
    own: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = idle = 0
    if not path.exists():
        return {"samples": 0, "error": f"no profile written to {path}"}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        if _parse(frames[-1])[0] in _IDLE:
            idle += count
            continue
        own[_short(frames[-1])] += count
        layers[_layer(frames[-1])] += count
        mine = {_short(f) for f in frames if _parse(f)[1].startswith(_OWN_CODE) and not _parse(f)[1].startswith(_ROOTS)}
        for name in mine:
            inclusive[name] += count
    busy = max(total - idle, 1)

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / busy, 1)) for name, n in counter.most_common(top)]

    return {"samples": total, "idle_pct": round(100 * idle / max(total, 1), 1), "own_pct": share(own),
            "layer_pct": share(layers), "inclusive_pct": share(inclusive), "raw": str(path)}


def render(summary: dict[str, Any]) -> str:
    lines = [f"samples: {summary.get('samples', 0)} ({summary.get('idle_pct', 0)}% idle); shares of busy samples"]
    for title, key in (("layer (leaf frame)", "layer_pct"), ("own (self) time", "own_pct"),
                       ("inclusive time, intentd code", "inclusive_pct")):
        lines.append(f"  top frames by {title}:")
        lines += [f"    {pct:5.1f}%  {name}" for name, pct in summary.get(key, [])]
    return "\n".join(lines)
