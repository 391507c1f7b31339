"""The client's public API is typed: mypy --strict checks a user's snippet,
infers what the calls return, and refuses a misspelt or mistyped argument."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api")

ROOT = Path(__file__).resolve().parents[2]

GOOD = """
    import asyncio
    from datetime import timedelta
    from typing import Any, assert_type

    from intentd.client import (
        AsyncIntentClient, AsyncIntentHandle, Event, Intent, IntentClient, IntentHandle, IntentType, Page,
    )

    def blocking() -> None:
        with IntentClient.from_env(sender="billing") as client:
            assert_type(client, IntentClient)
            assert_type(client.send_intent({"intent_type": "intent.a.b.v1", "to_agent": "agent://a/b/c"}), str)
            handle = client.start(intent_type="intent.a.b.v1", to_agent="agent://a/b/c", payload={"n": 1},
                                  idempotency_key="k", labels={"team": "a"}, max_attempts=3,
                                  deadline=timedelta(minutes=5))
            assert_type(handle, IntentHandle)
            assert_type(handle.id, str)
            assert_type(handle.result(timeout=60), Any)
            assert_type(handle.get(), Intent)
            assert_type(handle.cancel("stop"), Intent)
            for event in handle.watch():
                assert_type(event, Event)
            assert_type(client.list(states=["FAILED"], page_size=10), Page)
            assert_type(client.wait_for(handle.id, 5, raise_on_failure=True), Intent)
            assert_type(client.put_intent_type(IntentType(intent_type="intent.a.b.v1", max_attempts=5)), IntentType)

    async def asynchronous() -> None:
        async with AsyncIntentClient("127.0.0.1:7300", api_key="k", tls_ca_file="ca.pem") as client:
            handle = await client.start(intent_type="intent.a.b.v1", to_agent="agent://a/b/c")
            assert_type(handle, AsyncIntentHandle)
            assert_type(await handle.get(), Intent)
            async for event in handle.watch(after_seq=2):
                assert_type(event, Event)
            async for intent in client.iter_intents(to_agent="agent://a/b/c"):
                assert_type(intent, Intent)
            assert_type(await client.list_intent_types(), list[IntentType])

    asyncio.run(asynchronous())
"""

BAD = """
    from intentd.client import IntentClient

    client = IntentClient()
    client.send_intent(intent_typ="intent.a.b.v1")
    client.start(intent_type="intent.a.b.v1", max_attempts="3")
    client.list(state="FAILED")
    client.get(42)
"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The import name over the source folders, as scripts/typecheck.sh shows it to mypy."""
    root = tmp_path_factory.mktemp("typing")
    (root / "intentd").mkdir()
    for package in ("core", "generated", "client"):
        (root / "intentd" / package).symlink_to(ROOT / package)
    return root


def check(tree: Path, name: str, source: str) -> tuple[str, int]:
    snippet = tree / f"{name}.py"
    snippet.write_text(textwrap.dedent(source))
    stdout, stderr, status = mypy_api.run([
        "--config-file", str(ROOT / "pyproject.toml"), "--namespace-packages", "--explicit-package-bases",
        "--cache-dir", str(tree / ".mypy_cache"), "--no-error-summary", str(snippet),
    ])
    return stdout + stderr, status


@pytest.mark.timeout(300)
def test_the_public_api_is_typed(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree)
    output, status = check(tree, "good", GOOD)
    assert status == 0, output
    output, status = check(tree, "bad", BAD)
    assert status == 1
    errors = [line for line in output.splitlines() if ": error:" in line]
    assert len(errors) == 4, output
    assert 'Unexpected keyword argument "intent_typ"' in output
    assert '"max_attempts"' in output and '"str"' in output
    assert 'Unexpected keyword argument "state"' in output
    assert 'Argument 1 to "get" of "IntentClient" has incompatible type "int"' in output
