"""What the numbers were measured on."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench.harness import ADMIN_URL, ROOT


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024 / 1024, 1)
    return 0.0


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def cpu_idle_fraction(seconds: float = 1.0) -> float:
    """Share of all CPUs idle over ``seconds`` (others' load on the machine)."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(total1 - total0, 1)


def source_state() -> dict[str, Any]:
    """The commit measured, and whether the working tree differed from it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain").splitlines()
               if not line[3:].startswith("bench/")]
    return {"commit": git("rev-parse", "HEAD").strip(), "changed_outside_bench": changed}


async def describe() -> dict[str, Any]:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        pg = {name: await conn.fetchval(f"SHOW {name}") for name in (
            "server_version", "synchronous_commit", "fsync", "wal_sync_method", "shared_buffers",
            "max_connections", "commit_delay")}
    finally:
        await conn.close()
    return {
        "nproc": os.cpu_count(),
        "memory_gib": _mem_gib(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": pg,
        "loadavg_at_start": loadavg(),
        "cpu_idle_at_start": round(cpu_idle_fraction(), 3),
        "source": source_state(),
    }
