"""Optional OpenTelemetry tracing: W3C trace context from the client's send
to the agent's handler and steps.

Everything here works without OpenTelemetry installed (``pip install
'intentd[tracing]'`` adds it): spans are then no-ops, ``inject`` adds nothing
and ``extract`` returns None. With the API installed but no SDK configured,
spans are non-recording and cost almost nothing.

How a trace flows:

1. The client SDK, inside a current span (the caller's), opens a CLIENT span
   ``intentd.send`` and puts its ``traceparent`` (and ``tracestate``) in the
   gRPC metadata of SendIntent / SendIntents (``inject``).
2. The control plane copies the incoming ``traceparent`` metadata
   (``traceparent_from_metadata``) into the intent's labels under
   ``TRACEPARENT_LABEL`` when it creates the intent, so it reaches every
   attempt's ``Assignment.intent.labels`` (the sidecar passes labels through).
3. The agent SDK opens a CONSUMER span ``intentd.handle`` per attempt whose
   parent is that label, and an INTERNAL span ``intentd.step`` per step
   (replayed steps too, with ``intentd.step.replayed=true``). All attempts of
   an intent are children of the send span: one trace per intent.

Libraries (client, agent) never configure a tracer provider: the
application's own OpenTelemetry set-up receives their spans. intentd
processes call ``configure()``, which acts only when ``INTENTD_TRACING`` is
``console`` (spans to stderr) or ``otlp`` (the OTLP exporter, configured by
the standard ``OTEL_EXPORTER_OTLP_*`` variables; needs
``opentelemetry-exporter-otlp``), and never replaces a provider the
application already set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from .. import __version__

log = logging.getLogger("intentd.tracing")

ENV = "INTENTD_TRACING"
MODES = ("off", "console", "otlp")
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# The intent label the control plane stores the sender's traceparent under.
TRACEPARENT_LABEL = TRACEPARENT
_TRACEPARENT_RE = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_INVALID_IDS = ("0" * 32, "0" * 16)

AVAILABLE: bool
try:
    from opentelemetry import context as _otel_context  # type: ignore[import-not-found,import-untyped,unused-ignore]
    from opentelemetry import propagate as _propagate  # type: ignore[import-not-found,import-untyped,unused-ignore]
    from opentelemetry import trace as _trace  # type: ignore[import-not-found,import-untyped,unused-ignore]
except ImportError:  # the optional extra is not installed: everything is a no-op
    AVAILABLE = False
else:
    AVAILABLE = True
    _tracer = _trace.get_tracer("intentd", __version__)

Metadata = Iterable[tuple[str, Any]]


def available() -> bool:
    """Whether the OpenTelemetry API is importable."""
    return AVAILABLE


# ---------------------------------------------------------------- spans


class SpanHandle:
    """A started span that is the current one until ``end()``; a no-op
    without OpenTelemetry. ``end`` must run in the context that started it
    (same task, or same thread)."""

    def __init__(self, span: Any = None, token: Any = None) -> None:
        self._span = span
        self._token = token
        self._ended = False

    @property
    def recording(self) -> bool:
        return self._span is not None and bool(self._span.is_recording())

    @property
    def trace_id(self) -> str | None:
        """The trace id in hex, None for a no-op span."""
        if self._span is None:
            return None
        context = self._span.get_span_context()
        return format(context.trace_id, "032x") if context.is_valid else None

    def set_attribute(self, key: str, value: Any) -> None:
        if self._span is not None and value is not None:
            self._span.set_attribute(key, value)

    def set_error(self, description: str) -> None:
        if self._span is not None:
            self._span.set_status(_trace.Status(_trace.StatusCode.ERROR, description))

    def end(self, error: BaseException | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        if self._span is None:
            return
        try:
            if isinstance(error, asyncio.CancelledError):
                # Revoked or shut down: stopped, not failed.
                self._span.set_attribute("intentd.cancelled", True)
            elif error is not None:
                self._span.record_exception(error)
                self.set_error(f"{type(error).__name__}: {error}")
            self._span.end()
        finally:
            if self._token is not None:
                _otel_context.detach(self._token)


_NOOP = SpanHandle()


def _has_current_span() -> bool:
    return bool(_trace.get_current_span().get_span_context().is_valid)


def start_span(
    name: str,
    *,
    kind: str = "internal",
    parent: Any = None,
    traceparent: str | None = None,
    tracestate: str | None = None,
    attributes: Mapping[str, Any] | None = None,
    child_only: bool = False,
) -> SpanHandle:
    """Starts ``name`` and makes it current; call ``end()`` on the result.

    The parent is ``parent`` (a context from ``extract``), else the context
    of ``traceparent``/``tracestate``, else the current span. ``kind`` is
    internal, client, server, producer or consumer. With ``child_only`` and no
    parent of any kind, nothing is started (no new root traces).
    """
    if not AVAILABLE:
        return _NOOP
    if parent is None and traceparent:
        carrier = {TRACEPARENT: traceparent}
        if tracestate:
            carrier[TRACESTATE] = tracestate
        parent = _propagate.extract(carrier)
    if child_only and parent is None and not _has_current_span():
        return _NOOP
    span = _tracer.start_span(
        name,
        context=parent,
        kind=_trace.SpanKind[kind.upper()],
        attributes={k: v for k, v in (attributes or {}).items() if v is not None},
    )
    token = _otel_context.attach(_trace.set_span_in_context(span))
    return SpanHandle(span, token)


@contextlib.contextmanager
def span(
    name: str,
    *,
    kind: str = "internal",
    parent: Any = None,
    traceparent: str | None = None,
    attributes: Mapping[str, Any] | None = None,
    child_only: bool = False,
    **attrs: Any,
) -> Iterator[SpanHandle]:
    """``with span("intentd.thing", **{"intentd.intent_id": id}) as s:`` --
    ``start_span`` as a block; an exception ends the span with an error
    status (a cancellation as ``intentd.cancelled``) and propagates."""
    handle = start_span(name, kind=kind, parent=parent, traceparent=traceparent,
                        attributes={**(attributes or {}), **attrs}, child_only=child_only)
    try:
        yield handle
    except BaseException as exc:
        handle.end(exc)
        raise
    handle.end()


# ---------------------------------------------------------------- propagation


def _carrier(metadata: Mapping[str, Any] | Metadata | None) -> dict[str, str]:
    items = metadata.items() if isinstance(metadata, Mapping) else (metadata or ())
    carrier: dict[str, str] = {}
    for key, value in items:
        if isinstance(value, bytes):
            continue  # binary (-bin) metadata is no trace context
        carrier[str(key).lower()] = str(value)
    return carrier


def inject(metadata: Metadata | None = None) -> list[tuple[str, str]]:
    """``metadata`` plus ``traceparent`` (and ``tracestate``) of the current
    span, for a gRPC call; unchanged when there is no valid current span."""
    out = [(str(key), value) for key, value in (metadata or ())]
    if not AVAILABLE or not _has_current_span():
        return out
    carrier: dict[str, str] = {}
    _propagate.inject(carrier)
    present = {key.lower() for key, _ in out}
    out.extend((key.lower(), value) for key, value in carrier.items() if key.lower() not in present)
    return out


def extract(metadata: Mapping[str, Any] | Metadata | None) -> Any:
    """The OpenTelemetry context carried by gRPC metadata (pairs, e.g.
    ``context.invocation_metadata()``) or a mapping (e.g. intent labels);
    None without OpenTelemetry. Use it as ``parent=`` of a span."""
    if not AVAILABLE:
        return None
    return _propagate.extract(_carrier(metadata))


def traceparent_from_metadata(metadata: Mapping[str, Any] | Metadata | None) -> str | None:
    """The W3C ``traceparent`` in gRPC metadata, if well-formed (version,
    32-hex trace id, 16-hex span id, flags; not all zeros), else None. Needs
    no OpenTelemetry: the control plane stores it in the intent's labels."""
    value = _carrier(metadata).get(TRACEPARENT, "").strip().lower()
    if not _TRACEPARENT_RE.match(value):
        return None
    _, trace_id, span_id, _ = value.split("-")
    if value.startswith("ff") or trace_id == _INVALID_IDS[0] or span_id == _INVALID_IDS[1]:
        return None
    return value


def current_traceparent() -> str | None:
    """The ``traceparent`` of the current span, None without one."""
    for key, value in inject():
        if key == TRACEPARENT:
            return value
    return None


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the current span, for log correlation."""
    if not AVAILABLE:
        return None
    context = _trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


# ---------------------------------------------------------------- set-up

_provider: Any = None


def configure(mode: str | None = None, *, service_name: str = "intentd") -> bool:
    """Sets up a tracer provider from ``mode`` (default: ``INTENTD_TRACING``):
    ``""``/``off`` does nothing, ``console`` prints spans to stderr, ``otlp``
    exports with the OTLP exporter (``OTEL_EXPORTER_OTLP_*`` variables).
    ``OTEL_SERVICE_NAME`` wins over ``service_name``. Returns whether spans
    are now exported. A missing package is a warning, not an error (tracing
    is never worth not starting); an unknown mode is a ValueError."""
    global _provider
    raw = os.environ.get(ENV, "") if mode is None else mode
    chosen = raw.strip().lower()
    if chosen in ("", "off", "none", "false", "0"):
        return False
    if chosen not in MODES:
        raise ValueError(f"{ENV}: expected off, console or otlp, got {raw!r}")
    if not AVAILABLE:
        log.warning("%s=%s but OpenTelemetry is not installed (pip install 'intentd[tracing]'); tracing is off",
                    ENV, chosen)
        return False
    try:
        from opentelemetry.sdk.resources import Resource  # type: ignore[import-not-found,import-untyped,unused-ignore]
        from opentelemetry.sdk.trace import (  # type: ignore[import-not-found,import-untyped,unused-ignore]
            SpanProcessor,
            TracerProvider,
        )
        from opentelemetry.sdk.trace.export import (  # type: ignore[import-not-found,import-untyped,unused-ignore]
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
            SpanExporter,
        )
    except ImportError:
        log.warning("%s=%s but opentelemetry-sdk is not installed (pip install 'intentd[tracing]'); tracing is off",
                    ENV, chosen)
        return False
    current = _trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        # The application (or an earlier call) set one up: use it as it is.
        return True
    processor: SpanProcessor
    if chosen == "console":
        processor = SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr))
    else:
        exporter = _otlp_exporter()
        if exporter is None:
            log.warning("%s=otlp but no OTLP exporter is installed (pip install opentelemetry-exporter-otlp); "
                        "tracing is off", ENV)
            return False
        assert isinstance(exporter, SpanExporter)
        processor = BatchSpanProcessor(exporter)
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(processor)
    _trace.set_tracer_provider(provider)
    _provider = provider
    log.info("tracing on (%s)", chosen)
    return True


def _otlp_exporter() -> Any:
    with contextlib.suppress(ImportError):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found,import-untyped,unused-ignore]
            OTLPSpanExporter,
        )
        return OTLPSpanExporter()
    with contextlib.suppress(ImportError):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found,import-untyped,unused-ignore]
            OTLPSpanExporter as HTTPSpanExporter,
        )
        return HTTPSpanExporter()
    return None


def flush(timeout_s: float = 5.0) -> None:
    """Exports the spans still buffered by the provider ``configure`` set up
    (it also flushes at interpreter exit by itself)."""
    if _provider is not None:
        _provider.force_flush(int(timeout_s * 1000))


def shutdown() -> None:
    """Flushes and stops the provider ``configure`` set up (at process exit)."""
    global _provider
    provider, _provider = _provider, None
    if provider is not None:
        provider.shutdown()
