"""Runs the orchestrator example end to end on this machine, on loopback:
a control plane (embedded PostgreSQL unless --database-url), four sidecars
each supervising one agent (the orchestrator, the research and coding
agents in Python, the reviewer in Node.js), one intent; then prints the
result and the tree of intents (`intentd get ID --tree`).

    python examples/orchestrator/run.py [--topic ...] [--spec ...] [--database-url URL]

Exits 0 when the intent COMPLETED with its three children, 1 otherwise
(printing the logs). Needs `pip install 'intentd[server]'`, node and npm.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
NODE_DIR = HERE.parent / "node"
INTENTD = [sys.executable, "-m", "intentd.commands"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serving(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.2):
            return True
    except OSError:
        return False


class Stack:
    """The processes of one run, each in a session of its own so that a
    sidecar and the agent it supervises stop together."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.work = work
        self.env = env
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with (self.work / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(argv, env={**self.env, **(extra_env or {})}, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def sidecar(self, name: str, server: str, address: str, command: str,
                extra_env: dict[str, str] | None = None) -> None:
        # Short socket paths: sockaddr_un holds about 107 bytes, whatever TMPDIR is.
        socket_path = f"/tmp/intentd-orch-{uuid.uuid4().hex[:8]}.sock"
        self.spawn(name, [*INTENTD, "sidecar", "--server", server, "--address", address,
                          "--listen", f"unix://{socket_path}", "--exec", command], extra_env)

    def logs(self) -> str:
        return "\n".join(f"--- {name}.log\n{(self.work / f'{name}.log').read_text()[-3000:]}"
                         for name, _ in self.procs)

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for _, proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def node_ready() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise SystemExit("the reviewer is a Node.js agent: install node (18 or later) and npm")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        print(f"installing the Node example's packages (npm ci in {NODE_DIR})", flush=True)
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=600)
    return node


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topic", default="durable agent orchestration")
    parser.add_argument("--spec", default="a function that answers the question")
    parser.add_argument("--database-url", help="a real PostgreSQL (default: the embedded one)")
    parser.add_argument("--data-dir", help="the embedded PostgreSQL's data directory")
    parser.add_argument("--org", default=f"example{uuid.uuid4().hex[:6]}",
                        help="the org of the four agents' addresses (a fresh one per run by default)")
    parser.add_argument("--payload", default="{}",
                        help="JSON merged into the intent's payload (e.g. crash_after_start, ledger)")
    parser.add_argument("--timeout", type=float, default=90.0)
    parser.add_argument("--json", action="store_true", help="print the final intent and the tree as JSON")
    args = parser.parse_args(argv)

    from intentd.client import IntentClient, IntentState, WaitTimeout

    node = node_ready()
    work = Path(tempfile.mkdtemp(prefix="intentd-orchestrator-"))
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "INTENTD_LOG_LEVEL": "WARNING", "ORCHESTRATOR_ORG": args.org}
    if args.database_url:
        env["INTENTD_DATABASE_URL"] = args.database_url
    if args.data_dir:
        env["INTENTD_DATA_DIR"] = args.data_dir
    org = args.org
    stack = Stack(work, env)
    try:
        # Loopback only, so no keys (with keys on, the orchestrator's sidecar
        # key would need --send 'agent://<org>/local/*').
        server = stack.spawn("server", [*INTENTD, "server"], {"INTENTD_LISTEN": address, "INTENTD_AUTH": "off"})
        deadline = time.monotonic() + 120
        while not serving(address):
            if server.poll() is not None or time.monotonic() > deadline:
                print("the control plane did not start:\n" + stack.logs(), file=sys.stderr)
                return 1
            time.sleep(0.1)
        python = shlex.quote(sys.executable)
        stack.sidecar("orchestrator", address, f"agent://{org}/local/orchestrator",
                      f"{python} {shlex.quote(str(HERE / 'orchestrator.py'))}")
        for name, agent in (("research", "research"), ("coder", "coder")):
            stack.sidecar(name, address, f"agent://{org}/local/{agent}",
                          f"{python} {shlex.quote(str(HERE / 'workers.py'))} {agent}")
        stack.sidecar("reviewer", address, f"agent://{org}/local/reviewer",
                      f"{shlex.quote(node)} {shlex.quote(str(NODE_DIR / 'agent.js'))}",
                      {"AGENT_HANDLERS": str(HERE / "reviewer.js")})
        if not args.json:
            print(f"control plane  {address}  (logs in {work})")
            print(f"agents         agent://{org}/local/{{orchestrator,research,coder}} (Python), "
                  f"agent://{org}/local/reviewer (Node.js)", flush=True)

        payload: dict[str, Any] = {"topic": args.topic, "spec": args.spec, **json.loads(args.payload)}
        with IntentClient(address) as client:
            intent_id = client.send_intent(intent_type="intent.example.orchestrate.v1",
                                           to_agent=f"agent://{org}/local/orchestrator", payload=payload)
            if not args.json:
                print(f"sent           {intent_id}", flush=True)
            try:
                final = client.wait_for(intent_id, timeout=args.timeout)
            except WaitTimeout as exc:
                print(f"still {exc.intent.state.value} after {args.timeout:g}s:\n{stack.logs()}", file=sys.stderr)
                return 1
        tree = subprocess.run([*INTENTD, "get", intent_id, "--tree", "--target", address,
                               *(["--json"] if args.json else [])],
                              capture_output=True, text=True, env=env, timeout=60)
        if args.json:
            print(json.dumps({"id": intent_id, "state": final.state.value, "result": final.result,
                              "error": None if final.error is None else final.error.message,
                              "tree": json.loads(tree.stdout) if tree.returncode == 0 else None}))
        else:
            print(f"\n{final.state.value} after {final.attempt} attempt(s); result:")
            print(json.dumps(final.result, indent=2) if final.result is not None else final.error)
            print(f"\n$ intentd get {intent_id} --tree\n{tree.stdout}{tree.stderr}", end="")
        if final.state is not IntentState.COMPLETED or final.child_count != 3:
            print(f"\nnot what the example should do (state {final.state.value}, "
                  f"{final.child_count} children):\n{stack.logs()}", file=sys.stderr)
            return 1
        return 0
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
