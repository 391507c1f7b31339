"""``python -m intentd.commands.chaos``: one soak run; exit 0 when every invariant held."""

from __future__ import annotations

import json
import signal
import sys
from types import FrameType

from . import run_soak
from .config import config_from_args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_from_args(argv)
    except ValueError as exc:
        print(f"python -m intentd.commands.chaos: {exc}", file=sys.stderr)
        return 2
    # SIGTERM cleans up like Ctrl-C: every process of the run is killed.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = run_soak(cfg)
    except KeyboardInterrupt:
        print("interrupted; every process of the run was killed", file=sys.stderr)
        return 130
    print()
    print(report.format())
    if cfg.verbose and report.fault_log:
        print("\nfaults:\n  " + "\n  ".join(report.fault_log))
    print("\nlatencies (json): " + json.dumps({lat.name: lat.as_dict() for lat in report.latencies}))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
