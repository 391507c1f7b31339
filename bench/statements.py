"""Which statements the control plane runs per intent, from PostgreSQL's own
log (``--profile`` only).

``ALTER DATABASE <bench db> SET log_statement = 'all'`` (that database only,
before the server connects) makes PostgreSQL log every statement of it; the
log lines are then matched against the server's named queries
(``intentd.server.queries``) and counted, with the transaction each ran in:
a statement outside BEGIN/COMMIT is a commit of its own. Needs a superuser
and a readable server log (``BENCH_PG_LOG``, default Debian's path).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from bench.harness import ADMIN_URL

PG_LOG = Path(os.environ.get("BENCH_PG_LOG", "/var/log/postgresql/postgresql-15-main.log"))
_ENTRY = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
_STATEMENT = re.compile(r"\[(?P<pid>\d+)\] \S*@(?P<db>\S+) LOG:  (?:execute [^:]*|statement): (?P<sql>.*)", re.S)


def _norm(sql: str) -> str:
    return " ".join(sql.replace(";", " ").split()).lower()


def _names() -> dict[str, str]:
    from intentd.server.queries import load_queries

    return {_norm(sql): name for name, sql in load_queries().items()}


@dataclass
class Mix:
    executions: Counter[str] = field(default_factory=Counter)
    commits: Counter[str] = field(default_factory=Counter)  # who ended each committed transaction

    def per(self, n: int) -> dict[str, Any]:
        return {
            "executions_per_intent": {k: round(v / n, 3) for k, v in self.executions.most_common()},
            "commits_per_intent": {k: round(v / n, 3) for k, v in self.commits.most_common()},
            "total_commits_per_intent": round(sum(self.commits.values()) / n, 3),
        }


def parse(text: str, database: str) -> Mix:
    names = _names()
    entries: list[str] = []
    for line in text.splitlines():
        if _ENTRY.match(line):
            entries.append(line)
        elif entries:
            entries[-1] += "\n" + line
    mix = Mix()
    open_txn: dict[str, str] = {}  # pid -> first statement of its transaction block
    for entry in entries:
        m = _STATEMENT.search(entry)
        if m is None or m.group("db") != database:
            continue
        sql = _norm(m.group("sql"))
        pid = m.group("pid")
        if sql.startswith(("begin", "start transaction")):
            open_txn[pid] = ""
            continue
        if sql.startswith(("commit", "rollback", "end")):
            first = open_txn.pop(pid, "")
            if sql.startswith(("commit", "end")):
                mix.commits[f"transaction of {first or 'nothing'}"] += 1
            continue
        name = names.get(sql) or f"other: {sql[:60]}"
        mix.executions[name] += 1
        if pid in open_txn:
            open_txn[pid] = open_txn[pid] or name
        else:
            mix.commits[name] += 1
    return mix


def _read_from(offset: int) -> str:
    with open(PG_LOG, errors="replace") as log:
        log.seek(offset)
        return log.read()


class Capture:
    """What ``logged`` yields: ``restart()`` forgets what was logged so far
    (start-up); ``mix`` is set when the block ends."""

    def __init__(self) -> None:
        self.offset = PG_LOG.stat().st_size
        self.mix = Mix()

    def restart(self) -> None:
        self.offset = PG_LOG.stat().st_size


@contextlib.asynccontextmanager
async def logged(url: str) -> AsyncIterator[Capture]:
    """Logs every statement of the database while the block runs. Start the
    server inside the block: the setting applies to new connections."""
    if not os.access(PG_LOG, os.R_OK):
        raise RuntimeError(f"cannot read the PostgreSQL log {PG_LOG} (set BENCH_PG_LOG)")
    name = urlsplit(url).path.lstrip("/")
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" SET log_statement = \'all\'')
    finally:
        await admin.close()
    capture = Capture()
    try:
        yield capture
    finally:
        capture.mix = parse(_read_from(capture.offset), name)
