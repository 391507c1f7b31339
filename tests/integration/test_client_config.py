"""The client's own auth and TLS arguments, its constructor from the
environment and its admin calls, against a control plane with keys and
mutual TLS on."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from intentd.client import (
    AsyncIntentClient,
    IntentClient,
    IntentState,
    IntentType,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from tests.certs import Pki, make_pki
from tests.support import Keys, ServerThread, server_settings

AGENT = "agent://acme/prod/config-test"


@pytest.fixture(scope="module")
def secured(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, Pki]]:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    srv = ServerThread(server_settings(database_url, auth="on", tls_cert_file=pki.server_cert,
                                       tls_key_file=pki.server_key, tls_client_ca_file=pki.ca)).start()
    try:
        yield srv, pki
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def keys(database_url: str) -> dict[str, str]:
    tenant = f"cfg{uuid.uuid4().hex[:6]}"
    store = Keys(database_url)
    return {role: store.create(tenant, role, [role]) for role in ("client", "admin")}


def tls_env(srv: ServerThread, pki: Pki) -> dict[str, str]:
    return {"INTENTD_TARGET": srv.address, "INTENTD_TLS_CA_FILE": str(pki.ca),
            "INTENTD_TLS_CERT_FILE": str(pki.client_cert), "INTENTD_TLS_KEY_FILE": str(pki.client_key)}


def test_from_env_with_a_key_file_and_mutual_tls(secured: Any, keys: dict[str, str], tmp_path: Any) -> None:
    srv, pki = secured
    key_file = tmp_path / "key"
    key_file.write_text(keys["client"] + "\n")
    with IntentClient.from_env({**tls_env(srv, pki), "INTENTD_API_KEY_FILE": str(key_file)}) as client:
        handle = client.start(intent_type="intent.config.env.v1", to_agent=AGENT, payload={"n": 1})
        assert handle.get().state is IntentState.PENDING
        assert handle.cancel("done").state is IntentState.CANCELED
    with IntentClient.from_env(tls_env(srv, pki), max_retries=0) as anonymous, pytest.raises(Unauthenticated):
        anonymous.list(page_size=1)


async def test_api_key_and_tls_arguments(secured: Any, keys: dict[str, str]) -> None:
    srv, pki = secured
    async with AsyncIntentClient(srv.address, api_key=keys["client"], tls_ca_file=pki.ca,
                                 tls_cert_file=pki.client_cert, tls_key_file=pki.client_key) as client:
        handle = await client.start(intent_type="intent.config.args.v1", to_agent=AGENT)
        assert (await handle.get()).id == handle.id
        with pytest.raises(PermissionDenied):  # intent types need role admin
            await client.list_intent_types()


def test_intent_type_admin_calls(secured: Any, keys: dict[str, str]) -> None:
    srv, pki = secured
    name = f"intent.config.t{uuid.uuid4().hex[:8]}.v1"
    with IntentClient.from_env({**tls_env(srv, pki), "INTENTD_API_KEY": keys["admin"]}) as client:
        with pytest.raises(NotFound):
            client.get_intent_type(name)
        stored = client.put_intent_type(IntentType(intent_type=name, max_attempts=5, heartbeat_timeout_ms=15_000))
        assert (stored.max_attempts, stored.heartbeat_timeout_ms, stored.retry_backoff_ms) == (5, 15_000, 100)
        assert stored.update_time is not None
        assert client.get_intent_type(name) == stored
        again = client.put_intent_type(replace(stored, max_attempts=7))
        assert again.max_attempts == 7
        assert name in [t.intent_type for t in client.list_intent_types()]
        # The type's setting reaches the intents sent without their own.
        assert client.start(intent_type=name, to_agent=AGENT).get().max_attempts == 7
