"""Keys, roles, tenants, scoped sidecars, TLS and mutual TLS, quotas, audit."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from intentd.client import (
    AsyncIntentClient,
    IntentClient,
    IntentState,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from intentd.core.config import SettingsError, load_settings
from intentd.generated.v1 import admin_service_pb2 as admin_pb
from intentd.generated.v1 import admin_service_pb2_grpc as admin_grpc
from intentd.generated.v1 import intent_service_pb2 as pb
from intentd.generated.v1 import intent_service_pb2_grpc as pb_grpc
from intentd.server import auth as auth_module
from intentd.server.settings import ServerSettings
from tests.certs import make_pki
from tests.support import Keys, RawSidecar, bearer

TYPE = "intent.secure.work.v1"


@pytest.fixture(scope="module")
def secure(database_url) -> Iterator[tuple[Any, Keys, dict[str, str], dict[str, str]]]:
    from tests.support import ServerThread, server_settings

    srv = ServerThread(server_settings(database_url, auth="on")).start()
    keys = Keys(database_url)
    a, b = f"acme{uuid.uuid4().hex[:6]}", f"beta{uuid.uuid4().hex[:6]}"
    made = {
        "a_client": keys.create(a, "a-client", ["client"]),
        "a_admin": keys.create(a, "a-admin", ["admin"]),
        "a_agent": keys.create(a, "a-agent", ["agent"], (f"agent://{a}/prod/*",)),
        "b_client": keys.create(b, "b-client", ["client"]),
        "b_admin": keys.create(b, "b-admin", ["admin"]),
        "b_agent": keys.create(b, "b-agent", ["agent"], ("agent://*",)),
        "expired": keys.create(a, "old", ["client"], expire=datetime.now(UTC) - timedelta(seconds=1)),
    }
    yield srv, keys, made, {"a": a, "b": b}
    srv.stop()


def test_calls_without_or_with_bad_keys_are_unauthenticated(secure) -> None:
    srv, _, made, _ = secure
    with grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.IntentServiceStub(channel)
        bogus = "intentd_aaaaaaaaaaaa_" + "b" * 52
        for metadata in ([], bearer("not-a-key"), bearer(bogus), [("authorization", "Basic dXNlcjpwYXNz")],
                         bearer(made["expired"])):
            for call, request in ((stub.GetIntent, pb.GetIntentRequest(id="01m8dsnxs4vrf409wync0kdayv")),
                                  (stub.ListIntents, pb.ListIntentsRequest()),
                                  (stub.SendIntent, pb.SendIntentRequest(intent=pb.IntentSpec(
                                      intent_type=TYPE, to_agent="agent://x/y/z")))):
                with pytest.raises(grpc.RpcError) as err:
                    call(request, metadata=metadata, timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                for _, value in metadata:
                    assert value.split()[-1] not in err.value.details()  # never echo the secret


def test_roles(secure) -> None:
    srv, _, made, names = secure
    with IntentClient(srv.address, metadata=bearer(made["a_agent"])) as agent_as_client:
        with pytest.raises(PermissionDenied, match="needs 'client'"):
            agent_as_client.send_intent(intent_type=TYPE, to_agent=f"agent://{names['a']}/prod/x", payload={})
    with IntentClient(srv.address, metadata=bearer(made["a_client"])) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=f"agent://{names['a']}/prod/x", payload={})
        with pytest.raises(PermissionDenied):
            client.retry(intent_id)
    with grpc.insecure_channel(srv.address) as channel:
        admin = admin_grpc.AdminServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            admin.PutIntentType(admin_pb.PutIntentTypeRequest(intent_type=admin_pb.IntentType(intent_type=TYPE)),
                                metadata=bearer(made["a_client"]), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        admin.PutIntentType(admin_pb.PutIntentTypeRequest(intent_type=admin_pb.IntentType(
            intent_type=TYPE, max_attempts=4)), metadata=bearer(made["a_admin"]), timeout=10)
    with pytest.raises(grpc.RpcError) as err:
        RawSidecar(srv.address, f"agent://{names['a']}/prod/x", metadata=bearer(made["a_client"]))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_every_rpc_across_tenants_sees_nothing(secure) -> None:
    srv, _, made, names = secure
    with IntentClient(srv.address, metadata=bearer(made["a_client"])) as a:
        intent_id = a.send_intent(intent_type=TYPE, to_agent=f"agent://{names['a']}/prod/x", payload={"secret": 1})
    with IntentClient(srv.address, metadata=bearer(made["b_client"])) as b, \
            IntentClient(srv.address, metadata=bearer(made["b_admin"])) as b_admin:
        for call in (b.get, b.cancel, b.steps, lambda i: b.wait_for(i, timeout=1), lambda i: list(b.watch(i)),
                     b_admin.retry):
            with pytest.raises(NotFound):
                call(intent_id)
        assert intent_id not in {i.id for i in b_admin.iter_intents()}
    with IntentClient(srv.address, metadata=bearer(made["a_client"])) as a:
        assert a.get(intent_id).state is IntentState.PENDING  # untouched by tenant b
    # A sidecar of tenant b serving the very same address string gets nothing of tenant a's.
    thief = RawSidecar(srv.address, f"agent://{names['a']}/prod/x", metadata=bearer(made["b_agent"]))
    try:
        with pytest.raises(Exception):  # noqa: B017 - queue.Empty: nothing arrives
            thief.recv("assignment", timeout=1.5)
    finally:
        thief.close()


def test_sidecar_scope(secure) -> None:
    srv, _, made, names = secure
    with pytest.raises(grpc.RpcError) as err:
        RawSidecar(srv.address, f"agent://{names['a']}/dev/x", metadata=bearer(made["a_agent"]))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"agent://{names['a']}/prod/*" in err.value.details()
    with IntentClient(srv.address, metadata=bearer(made["a_client"])) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=f"agent://{names['a']}/prod/scoped", payload={})
    sidecar = RawSidecar(srv.address, f"agent://{names['a']}/prod/scoped", metadata=bearer(made["a_agent"]))
    try:
        assert sidecar.recv("assignment").intent.id == intent_id
    finally:
        sidecar.close()


def test_revocation_reaches_open_streams_within_seconds(secure) -> None:
    srv, keys, _, names = secure
    client_key = keys.create(names["a"], f"short-{uuid.uuid4().hex[:6]}", ["client"])
    agent_name = f"agent-{uuid.uuid4().hex[:6]}"
    agent_key = keys.create(names["a"], agent_name, ["agent"], (f"agent://{names['a']}/*",))
    with IntentClient(srv.address, metadata=bearer(client_key), max_retries=0) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=f"agent://{names['a']}/prod/rv", payload={})
        sidecar = RawSidecar(srv.address, f"agent://{names['a']}/prod/other", metadata=bearer(agent_key))
        keys.revoke(names["a"], agent_name)
        keys.revoke(names["a"], keys.sql("SELECT name FROM api_keys WHERE tenant=$1 AND name LIKE 'short-%'",
                                         names["a"])[0]["name"])
        started = time.monotonic()
        with pytest.raises(Unauthenticated, match="revoked"):
            for _ in client.watch(intent_id):
                pass
        assert time.monotonic() - started < 8
        with pytest.raises(grpc.RpcError) as err:
            sidecar.recv("never", timeout=8)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert time.monotonic() - started < 10
        with pytest.raises(Unauthenticated):
            client.get(intent_id)


def test_quota_exhaustion_and_recovery(secure) -> None:
    srv, keys, _, _ = secure
    tenant = f"quota{uuid.uuid4().hex[:6]}"
    rate_key = keys.create(tenant, "rate", ["client"], rate=2)
    with grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.IntentServiceStub(channel)
        spec = pb.SendIntentRequest(intent=pb.IntentSpec(intent_type=TYPE, to_agent=f"agent://{tenant}/p/x"))
        stub.SendIntent(spec, metadata=bearer(rate_key), timeout=10)
        stub.SendIntent(spec, metadata=bearer(rate_key), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            stub.SendIntent(spec, metadata=bearer(rate_key), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        retry_after = int(dict(err.value.trailing_metadata())["retry-after-ms"])
        assert 0 < retry_after <= 1000
        time.sleep(retry_after / 1000)
        stub.SendIntent(spec, metadata=bearer(rate_key), timeout=10)  # recovered
    # A tenant of its own, whose quota row the server has not cached yet.
    tenant = f"live{uuid.uuid4().hex[:6]}"
    live_key = keys.create(tenant, "live", ["client"])
    keys.sql("UPDATE tenants SET max_live_intents = 1 WHERE name = $1", tenant)
    with IntentClient(srv.address, metadata=bearer(live_key)) as client:
        client.send_intent(intent_type=TYPE, to_agent=f"agent://{tenant}/p/x", payload={})
        with pytest.raises(ResourceExhausted, match="live intents"):
            client.send_intent(intent_type=TYPE, to_agent=f"agent://{tenant}/p/x", payload={})
        oldest = list(client.iter_intents())[-1]
        client.cancel(oldest.id)
        time.sleep(1.1)  # live counts are cached for 1 s
        client.send_intent(intent_type=TYPE, to_agent=f"agent://{tenant}/p/x", payload={})


async def test_cancel_and_admin_changes_are_audited_with_the_key_name(secure) -> None:
    srv, keys, made, names = secure
    async with AsyncIntentClient(srv.address, metadata=bearer(made["a_client"])) as client:
        intent_id = await client.send_intent(intent_type=TYPE, to_agent=f"agent://{names['a']}/prod/x", payload={})
        await client.cancel(intent_id, reason="audit me")
    rows = keys.sql("SELECT actor FROM intent_events WHERE intent_id=$1 AND type='CANCELED'", intent_id)
    assert [r["actor"] for r in rows] == ["a-client"]
    rows = keys.sql("SELECT actor, action FROM audit_log WHERE tenant=$1 ORDER BY id", names["a"])
    actions = [(r["actor"], r["action"]) for r in rows]
    assert ("a-admin", "intent_type.put") in actions and ("intentd keys", "key.create") in actions


def test_key_is_stored_only_as_a_hash(secure) -> None:
    _, keys, made, names = secure
    key = made["a_client"]
    rows = keys.sql("SELECT * FROM api_keys WHERE name='a-client' AND tenant=$1", names["a"])
    secret = key.rsplit("_", 1)[1]
    assert bytes(rows[0]["secret_sha256"]) == hashlib.sha256(secret.encode()).digest()
    assert all(secret not in str(v) for v in dict(rows[0]).values())


def test_key_comparison_is_constant_time(secure, monkeypatch) -> None:
    srv, _, made, _ = secure
    calls: list[tuple[bytes, bytes]] = []
    real = auth_module.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", spy)
    authenticator = srv.plane.auth
    for key in (made["a_client"][:-1] + "x", "intentd_zzzzzzzzzzzz_" + "q" * 52):
        with pytest.raises(auth_module.errors.Unauthenticated):
            srv.call(authenticator.verify(key, "client"))
    assert len(calls) == 2  # compared even for an id that does not exist


def test_tls_and_mutual_tls(database_url, tmp_path) -> None:
    from tests.support import ServerThread, free_port, health_ok, server_settings

    pki = make_pki(tmp_path)
    health_port = free_port()
    srv = ServerThread(server_settings(database_url, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key,
                                       health_listen=f"127.0.0.1:{health_port}")).start()
    try:
        # Kubelet-style probe: plaintext, health only.
        assert health_ok(f"127.0.0.1:{health_port}")
        trusted = grpc.ssl_channel_credentials(pki.ca.read_bytes())
        with IntentClient(srv.address, credentials=trusted) as client:
            assert client.list(page_size=1) is not None
        with IntentClient(srv.address, credentials=grpc.ssl_channel_credentials(pki.other_ca.read_bytes()),
                          max_retries=0, timeout=3) as wrong_ca, pytest.raises(Exception):  # noqa: B017
            wrong_ca.list(page_size=1)
        with IntentClient(srv.address, max_retries=0, timeout=3) as plaintext, pytest.raises(Exception):  # noqa: B017
            plaintext.list(page_size=1)
    finally:
        srv.stop()
    srv = ServerThread(server_settings(database_url, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key,
                                       tls_client_ca_file=pki.ca)).start()
    try:
        with IntentClient(srv.address, credentials=grpc.ssl_channel_credentials(
                pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes())) as client:
            assert client.list(page_size=1) is not None
        with IntentClient(srv.address, credentials=grpc.ssl_channel_credentials(pki.ca.read_bytes()),
                          max_retries=0, timeout=3) as anonymous, pytest.raises(Exception):  # noqa: B017
            anonymous.list(page_size=1)
    finally:
        srv.stop()


def test_plaintext_off_loopback_needs_an_explicit_yes_and_auth_defaults(tmp_path) -> None:
    with pytest.raises(SettingsError, match=r"INTENTD_LISTEN.*TLS"):
        load_settings(ServerSettings, environ={"INTENTD_LISTEN": "0.0.0.0:7300"})
    allowed = load_settings(ServerSettings, environ={"INTENTD_LISTEN": "0.0.0.0:7300", "INTENTD_ALLOW_INSECURE": "1",
                                                     "INTENTD_DATABASE_URL": "postgresql://x/y"})
    assert allowed.auth_enabled
    assert not load_settings(ServerSettings, environ={}).auth_enabled  # embedded on loopback: zero-config
    assert load_settings(ServerSettings, environ={"INTENTD_DATABASE_URL": "postgresql://x/y"}).auth_enabled
    with pytest.raises(SettingsError, match="INTENTD_TLS_CERT_FILE"):
        load_settings(ServerSettings, environ={"INTENTD_TLS_CERT_FILE": str(tmp_path / "missing.pem"),
                                               "INTENTD_TLS_KEY_FILE": str(tmp_path / "missing.key")})


def test_sidecar_with_a_scoped_key_over_mutual_tls_runs_intents(cluster, database_url, tmp_path, make_server) -> None:
    from tests.stack import begins, ledger

    pki = make_pki(tmp_path)
    srv = make_server(auth="on", tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca)
    keys = Keys(database_url)
    tenant = f"mtls{uuid.uuid4().hex[:6]}"
    org = cluster.address.split("/")[2]
    agent_key = keys.create(tenant, "sidecar", ["agent"], (f"agent://{org}/*",))
    client_key = keys.create(tenant, "client", ["client"])
    cluster.sidecar(srv.address, INTENTD_API_KEY=agent_key, INTENTD_TLS_CA_FILE=str(pki.ca),
                    INTENTD_TLS_CERT_FILE=str(pki.client_cert), INTENTD_TLS_KEY_FILE=str(pki.client_key))
    credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes(), pki.client_key.read_bytes(),
                                               pki.client_cert.read_bytes())
    with IntentClient(srv.address, credentials=credentials, metadata=bearer(client_key)) as client:
        intent_id = client.send_intent(intent_type="test.ledger.run.v1", to_agent=cluster.address,
                                       payload={"steps": 3})
        final = client.wait_for(intent_id, timeout=60)
    assert final.state is IntentState.COMPLETED, cluster.logs()
    assert final.tenant == tenant
    assert set(begins(ledger(cluster.db, intent_id)).values()) == {1}
