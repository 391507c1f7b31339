"""What the numbers were measured on."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench.harness import ADMIN_URL


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


def cpu_idle_fraction(seconds: float = 1.0) -> float:
    """Share of all CPUs idle over ``seconds`` (others' load on the machine)."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(total1 - total0, 1)


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
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "cpu_idle_at_start": round(cpu_idle_fraction(), 3),
    }
