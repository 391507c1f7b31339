"""Named SQL queries, loaded once from the .sql files beside this module.

Each query is a block that starts with ``-- name: <name>``; all SQL of the
control plane lives in those files (procrastinate's queries.sql, River's
river_job.sql), never in Python strings.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_NAME_RE = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def parse_queries(text: str) -> dict[str, str]:
    parts = _NAME_RE.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        sql = body.strip()
        if not sql:
            raise ValueError(f"query {name!r} is empty")
        queries[name] = sql
    return queries


@cache
def load_queries() -> dict[str, str]:
    queries: dict[str, str] = {}
    files = sorted(
        (f for f in resources.files("intentd.server").joinpath("sql").iterdir()
         if f.name.endswith(".sql")),
        key=lambda f: f.name,
    )
    for file in files:
        for name, sql in parse_queries(file.read_text("utf-8")).items():
            if name in queries:
                raise ValueError(f"query {name!r} is defined in two files")
            queries[name] = sql
    return queries


class Queries:
    """Attribute access to the named queries: ``Q.get_intent``."""

    def __getattr__(self, name: str) -> str:
        try:
            return load_queries()[name]
        except KeyError:
            raise AttributeError(f"no SQL query named {name!r}") from None


Q = Queries()
