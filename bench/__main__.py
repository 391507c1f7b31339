"""``python -m bench [--quick] [--only NAME ...] [--full] [--no-peers] [--profile]``"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench import harness, machine
from bench.suite import BY_NAME, Config, Run, plan, run_all

RESULTS = Path(__file__).resolve().parent / "results"


def _peers_installed() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("pgqueuer", "procrastinate", "dbos", "langgraph"))


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description="intentd benchmark suite")
    p.add_argument("--quick", action="store_true", help="small sizes; under 2 minutes")
    p.add_argument("--only", action="append", choices=sorted(BY_NAME),
                   help="run this scenario (repeatable) and the baselines it needs")
    p.add_argument("--full", action="store_true", help="also 500 sidecar streams -> server RSS per stream")
    peers = p.add_mutually_exclusive_group()
    peers.add_argument("--peers", dest="peers", action="store_true", default=None,
                       help="compare with pgqueuer, procrastinate, DBOS, LangGraph (default: on if installed)")
    peers.add_argument("--no-peers", dest="peers", action="store_false")
    p.add_argument("--profile", action="store_true",
                   help="py-spy the server and one sidecar+agent during an extra end-to-end pass")
    p.add_argument("--reps", type=int, help="repetitions per measurement (default 3, --quick 2)")
    p.add_argument("--n", type=int, help="intents per end-to-end pass (default 20000 capped by time, --quick 2000)")
    p.add_argument("--budget", type=float,
                   help="seconds after which remaining scenarios are skipped (default 500, --quick 95; 0: none)")
    p.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    return p.parse_args(argv)


async def main_async(args: argparse.Namespace) -> int:
    peers = _peers_installed() if args.peers is None else args.peers
    config = Config.make(quick=args.quick, full=args.full, peers=peers, profile=args.profile,
                         reps=args.reps, e2e_n=args.n, budget_s=args.budget)
    run = Run(config)
    run.report.meta.update(
        started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), argv=sys.argv[1:], config=config.__dict__,
        machine=await machine.describe(), logs=str(harness.LOG_DIR))

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    scenarios = plan(args.only, peers)
    log(f"bench: {', '.join(s.name for s in scenarios)} (logs in {harness.LOG_DIR})")
    began = time.monotonic()
    try:
        ok = await run_all(run, scenarios, log)
    finally:
        harness.kill_all()
        run.report.meta["seconds"] = round(time.monotonic() - began, 1)
        run.report.write(args.out)
    print(run.report.table())
    log(f"bench: {run.report.meta['seconds']:.0f}s; wrote {args.out}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        import uvloop

        return uvloop.run(main_async(args))
    except KeyboardInterrupt:
        harness.kill_all()
        return 130


if __name__ == "__main__":
    sys.exit(main())
