"""Metrics, log context and tracing for every intentd process.

- ``intentd.core.observability.metrics``: the Prometheus series of the control
  plane (``SERVER_REGISTRY``) and the sidecar (``SIDECAR_REGISTRY``) and
  ``start_metrics_server(listen, registry)``. Imported explicitly (it pulls in
  prometheus_client, which the client and agent SDKs do not need).
- ``intentd.core.observability.context``: ``log_context(intent_id=..., attempt=...,
  tenant=...)`` and ``set_process_fields(sidecar_id=...)``, the fields the
  JSON log formatter (``intentd.core.logs``) adds to every line.
- ``intentd.core.observability.tracing``: optional OpenTelemetry spans and W3C
  trace-context propagation; a no-op without the ``tracing`` extra.

docs/operating.md ("Metrics", "Tracing", "Logs") is the operator's view.
"""

from .context import bind_log_context, current_log_context, log_context, set_process_fields

__all__ = ["bind_log_context", "current_log_context", "log_context", "set_process_fields"]
