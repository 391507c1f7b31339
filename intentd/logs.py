"""Logging set-up shared by every intentd command."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # asyncpg and grpc are chatty at INFO about things operators cannot act on.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
