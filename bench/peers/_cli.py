"""Runs one peer measurement in its own process and prints it as one JSON line."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any


def main(measure: Callable[[str, int, int], Coroutine[Any, Any, dict[str, Any]]]) -> None:
    """``python -m bench.peers.<peer> URL N REPS``: REPS passes of N in one
    process (start-up and schema set-up paid once); "seconds" lists them."""
    url, n, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    result = asyncio.run(measure(url, n, reps))
    print("RESULT " + json.dumps(result), flush=True)
