"""What the gRPC services need of the wait store (``server.waits.WaitStore``,
the storage of durable waits, docs/waits.md).

The services are written against this and not the class, so that their
validation and permission rules stand on their own: the store decides the
state changes (locks, guarded updates), the services decide who may ask and
what a request may hold.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from .db import Database, Row


class SignalResult(Protocol):
    """The answer of ``WaitStore.signal``."""

    @property
    def intent(self) -> Row: ...

    @property
    def signal(self) -> Row: ...

    @property
    def created(self) -> bool: ...


class WaitStoreAPI(Protocol):
    async def signal(
        self, tenant: str, intent_id: str, name: str, payload: str, signal_id: str | None, sender: str,
        now: datetime | None = None,
    ) -> SignalResult: ...

    async def get_task(self, tenant: str, task_id: str) -> Row: ...

    async def list_tasks(
        self, tenant: str, *, states: Sequence[str], assignee: str | None, intent_type: str | None,
        intent_id: str | None, limit: int, before_id: str | None,
    ) -> list[Row]: ...

    async def decide_task(
        self, tenant: str, task_id: str, outcome: str, comment: str, form_data: str | None, actor: str,
        now: datetime | None = None,
    ) -> Row: ...


def open_wait_store(db: Database) -> WaitStoreAPI | None:
    """The replica's wait store, or None while ``server.waits`` is not part
    of this build: the wait RPCs then answer UNIMPLEMENTED."""
    name = f"{__package__}.waits"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise  # something the module needs is missing: that is an error, not an absence
        return None
    store: WaitStoreAPI = module.WaitStore(db)
    return store
