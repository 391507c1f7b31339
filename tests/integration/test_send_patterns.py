"""Send patterns of agent keys (docs/children.md, "Security"): made by
`intentd keys create --send` and KeyStore.create on a real PostgreSQL, read
back by the authenticator into Caller.send_patterns, judged by
Caller.may_send with the grammar of address patterns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import pytest

from intentd.server import errors
from intentd.server.auth import Authenticator, Caller, KeyStore
from intentd.server.db import Database
from tests.integration.test_hardening_streams import PATTERNS, REFUSED
from tests.support import ROOT

INTENTD = [sys.executable, "-m", "intentd.commands"]


def _intentd(*args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*INTENTD, *args, "--database-url", database_url], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[tuple[KeyStore, Database]]:
    db = Database(database_url, min_size=1, max_size=2)
    await db.open(run_migrations=False)
    yield KeyStore(db), db
    await db.close()


def _tenant() -> str:
    return f"send{uuid.uuid4().hex[:8]}"


async def test_an_agent_key_carries_its_send_patterns_to_the_caller(store: tuple[KeyStore, Database]) -> None:
    keys, db = store
    tenant = _tenant()
    row, key = await keys.create(tenant, "orch", ["agent"], [f"agent://{tenant}/prod/orchestrator"],
                                 send_patterns=[f"agent://{tenant}/prod/*", f"agent://{tenant}/tools/**"])
    assert list(row["send_patterns"]) == [f"agent://{tenant}/prod/*", f"agent://{tenant}/tools/**"]
    [listed] = [r for r in await keys.list(tenant) if r["name"] == "orch"]
    assert list(listed["send_patterns"]) == list(row["send_patterns"])
    async with db.connection() as conn:
        detail = await conn.fetchval(
            "SELECT detail FROM audit_log WHERE tenant = $1 AND action = 'key.create' AND target = 'orch'", tenant)
    assert json.loads(detail)["send_patterns"] == list(row["send_patterns"])

    caller = await Authenticator(db, enabled=True, default_tenant="default").verify(key, "agent")
    assert caller.send_patterns == (f"agent://{tenant}/prod/*", f"agent://{tenant}/tools/**")
    assert caller.may_send(f"agent://{tenant}/prod/research")
    assert caller.may_send(f"agent://{tenant}/tools/x/y")
    assert not caller.may_send(f"agent://{tenant}/dev/research")
    assert not caller.may_send(f"agent://{tenant}x/prod/research")
    # Serving and sending are separate permissions.
    assert caller.may_serve(f"agent://{tenant}/prod/orchestrator")
    assert not caller.may_serve(f"agent://{tenant}/prod/research")


async def test_a_key_without_send_patterns_may_send_nowhere(store: tuple[KeyStore, Database]) -> None:
    keys, db = store
    tenant = _tenant()
    _, key = await keys.create(tenant, "worker", ["agent"], [f"agent://{tenant}/*"])
    caller = await Authenticator(db, enabled=True, default_tenant="default").verify(key, "agent")
    assert caller.send_patterns == ()
    assert not caller.may_send(f"agent://{tenant}/prod/anything")
    # Authentication off: every address, as for serving.
    anonymous = Authenticator(db, enabled=False, default_tenant="default").anonymous()
    assert anonymous.may_send("agent://anyone/any/thing")


async def test_send_patterns_are_refused_where_they_grant_nothing(store: tuple[KeyStore, Database]) -> None:
    keys, _ = store
    tenant = _tenant()
    for roles in (["client"], ["admin"], ["client", "admin"]):
        with pytest.raises(errors.InvalidArgument, match="--send patterns are for agent keys"):
            await keys.create(tenant, "web", roles, send_patterns=[f"agent://{tenant}/prod/*"])
    with pytest.raises(errors.InvalidArgument, match=r"send pattern 'agent://acme/prod\*'"):
        await keys.create(tenant, "orch", ["agent"], [f"agent://{tenant}/*"], send_patterns=["agent://acme/prod*"])
    assert await keys.list(tenant) == []  # nothing was made


def test_keys_cli_create_and_list_with_send(database_url: str) -> None:
    tenant = _tenant()
    made = _intentd("keys", "create", "orch", "--tenant", tenant, "--role", "agent",
                    "--address", f"agent://{tenant}/prod/orchestrator",
                    "--send", f"agent://{tenant}/prod/*", "--send", f"agent://{tenant}/tools/*",
                    database_url=database_url)
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip().startswith("intentd_")
    assert f"may start children at agent://{tenant}/prod/* agent://{tenant}/tools/*" in made.stderr
    listed = _intentd("keys", "list", "--tenant", tenant, database_url=database_url)
    assert listed.returncode == 0, listed.stderr
    assert f"send: agent://{tenant}/prod/* agent://{tenant}/tools/*" in listed.stdout

    refused = _intentd("keys", "create", "web", "--tenant", tenant, "--role", "client",
                       "--send", f"agent://{tenant}/prod/*", database_url=database_url)
    assert refused.returncode == 2
    assert refused.stderr.startswith("intentd: INVALID_ARGUMENT: --send patterns are for agent keys")
    assert "Traceback" not in refused.stderr
    bad = _intentd("keys", "create", "orch2", "--tenant", tenant, "--role", "agent", "--address",
                   f"agent://{tenant}/*", "--send", "agent://acme/pr?d/*", database_url=database_url)
    assert bad.returncode == 2 and "INVALID_ARGUMENT: send pattern 'agent://acme/pr?d/*'" in bad.stderr


@pytest.mark.parametrize(("pattern", "address", "sends"), PATTERNS)
def test_may_send_uses_the_address_pattern_grammar(pattern: str, address: str, sends: bool) -> None:
    caller = Caller("t", "k", frozenset({"agent"}), send_patterns=(pattern,))
    assert caller.may_send(address) is sends
    assert not caller.may_serve(address)


@pytest.mark.parametrize("pattern", REFUSED)
def test_a_stored_send_pattern_outside_the_grammar_sends_nowhere(pattern: str) -> None:
    assert not Caller("t", "k", frozenset({"agent"}), send_patterns=(pattern,)).may_send("agent://acme/prod/x")
