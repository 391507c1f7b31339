"""A pytest plugin: ``pytest_plugins = ["intentd.testing.pytest_plugin"]`` in
your ``conftest.py`` gives the fixture ``intentd_env``, one
``IntentdEnvironment`` for the whole session (a control plane and its
database start once; each agent's sidecar starts at its first run).

It is a plain (not async) fixture: the environment runs on its own thread, so
it serves tests on any event loop, and sync tests through ``env.address``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .environment import IntentdEnvironment


@pytest.fixture(scope="session")
def intentd_env() -> Iterator[IntentdEnvironment]:
    with IntentdEnvironment.start() as env:
        yield env
