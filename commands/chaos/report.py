"""The result of a soak run and its printed form."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

EXAMPLES = 5


@dataclass
class Invariant:
    name: str
    checked: int = 0  # how many things were checked
    violations: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def ok(self) -> bool:
        return not self.violations

    def fail(self, message: str) -> None:
        self.violations.append(message)

    def detail(self) -> str:
        if self.ok:
            return f"{self.checked} checked{'; ' + self.note if self.note else ''}"
        shown = "; ".join(self.violations[:EXAMPLES])
        more = f" (+{len(self.violations) - EXAMPLES} more)" if len(self.violations) > EXAMPLES else ""
        return f"{len(self.violations)} of {self.checked}: {shown}{more}"


@dataclass
class Latency:
    name: str
    samples: list[float] = field(default_factory=list)

    def summary(self) -> str:
        if not self.samples:
            return "no samples"
        ordered = sorted(self.samples)
        p99 = ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered) + 0.5) - 1))]
        return (f"n={len(ordered)} median={statistics.median(ordered):.2f}s p99={p99:.2f}s "
                f"max={ordered[-1]:.2f}s")

    def as_dict(self) -> dict[str, Any]:
        if not self.samples:
            return {"n": 0}
        ordered = sorted(self.samples)
        p99 = ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered) + 0.5) - 1))]
        return {"n": len(ordered), "median": statistics.median(ordered), "p99": p99, "max": ordered[-1]}


@dataclass
class Report:
    seed: int
    settings: str = ""
    elapsed_s: float = 0.0
    fault_window_s: float = 0.0
    drain_s: float = 0.0
    intents_planned: int = 0
    intents_in_db: int = 0  # sent by the workload (children not counted: see ``family``)
    # Sends refused because their deadline passed while the client retried (nothing was created).
    sends_refused: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    states: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    faults_skipped: dict[str, int] = field(default_factory=dict)
    fault_log: list[str] = field(default_factory=list)
    # RELEASED events (agent died, sidecar stopped, lease expired, retryable
    # failure) plus lease expiries that ended in FAILED.
    redeliveries: int = 0
    extra_deliveries: int = 0  # deliveries after each intent's first, wakes from waits not counted
    wakes: int = 0  # deliveries that woke a parked intent
    released: dict[str, int] = field(default_factory=dict)
    step_runs: int = 0
    step_reruns: int = 0
    late_ledger_writes: int = 0
    # Family parents and their children (checks._check_families): "parents",
    # "parents completed", "parents ended otherwise", "children", "children
    # <STATE>", "children canceled by the cascade", "gather returns",
    # "redeliveries" (of parents and children, wakes not counted).
    family: dict[str, int] = field(default_factory=dict)
    latencies: list[Latency] = field(default_factory=list)
    invariants: list[Invariant] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    work_dir: str = ""
    # The hostile tenant: when it started (wall clock), each actor's summary
    # (intentd/chaos/hostile.py), and each replica's resident memory (first
    # sample, peak) in bytes.
    hostile_started_at: float | None = None
    hostile: list[dict[str, Any]] = field(default_factory=list)
    replica_rss: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(inv.ok for inv in self.invariants) and bool(self.invariants)

    @property
    def violations(self) -> list[str]:
        return [f"{inv.name}: {v}" for inv in self.invariants for v in inv.violations]

    def format(self) -> str:
        lines = [
            f"intentd chaos soak, seed {self.seed}: {'PASS' if self.ok else 'FAIL'}",
            f"  {self.settings}",
            f"  elapsed {self.elapsed_s:.1f}s (faults {self.fault_window_s:.1f}s, drain {self.drain_s:.1f}s);"
            f" logs: {self.work_dir or '(removed)'}",
            "",
            f"intents: {self.intents_planned} planned, {self.intents_in_db} in the database"
            + (f" (and {self.family['children']} children of theirs)" if self.family.get("children") else "")
            + (f", {self.sends_refused} sends refused (deadline passed while retrying)" if self.sends_refused else ""),
            "  by kind:  " + ", ".join(f"{k} {v}" for k, v in self.kinds.items()),
            "  by state: " + ", ".join(f"{k} {v}" for k, v in sorted(self.states.items())),
            "",
            "faults injected: " + (", ".join(f"{k} {v}" for k, v in self.faults.items()) or "none"),
        ]
        skipped = {k: v for k, v in self.faults_skipped.items() if v}
        if skipped:
            lines.append("  skipped (no target): " + ", ".join(f"{k} {v}" for k, v in skipped.items()))
        lines += [
            f"redeliveries: {self.redeliveries} (RELEASED events and lease expiries: "
            + (", ".join(f"{k} {v}" for k, v in sorted(self.released.items())) or "none")
            + f"); {self.extra_deliveries} deliveries after the first, besides {self.wakes} wakes from waits",
            f"step runs: {self.step_runs} ({self.step_reruns} re-runs of unrecorded steps;"
            f" {self.late_ledger_writes} side effects written after their step was recorded"
            " by a run that began before)",
        ]
        if self.family:
            f = self.family
            lines.append(
                f"families: {f.get('parents', 0)} parents ({f.get('parents completed', 0)} completed,"
                f" {f.get('parents ended otherwise', 0)} ended otherwise), {f.get('children', 0)} children ("
                + (", ".join(f"{k.removeprefix('children ')} {v}" for k, v in sorted(f.items())
                             if k.startswith("children ") and k != "children canceled by the cascade") or "none")
                + f"; {f.get('children canceled by the cascade', 0)} canceled by the cascade),"
                f" {f.get('gather returns', 0)} gather returns recorded; {f.get('redeliveries', 0)} deliveries"
                " after the first among them")
        for latency in self.latencies:
            lines.append(f"{latency.name}: {latency.summary()}")
        for actor in self.hostile:
            lines.append(f"hostile {actor.get('mode')}: sent {actor.get('sent')}, answers {actor.get('answers')},"
                         f" stream ends {actor.get('stream_ends')}, {actor.get('connects')} connects"
                         + (f"; {actor['notes'][-1]}" if actor.get("notes") else ""))
        if self.replica_rss:
            lines.append("replica memory (RSS, first sample -> peak): " + ", ".join(
                f"{name} {first / 2**20:.0f} -> {peak / 2**20:.0f} MiB"
                for name, (first, peak) in sorted(self.replica_rss.items())))
        lines += ["", self._table()]
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def _table(self) -> str:
        rows = [("invariant", "result", "detail")]
        rows += [(inv.name, "ok" if inv.ok else "FAIL", inv.detail()) for inv in self.invariants]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        out = []
        for i, (a, b, c) in enumerate(rows):
            out.append(f"{a:<{w0}}  {b:<{w1}}  {c}")
            if i == 0:
                out.append(f"{'-' * w0}  {'-' * w1}  {'-' * 40}")
        return "\n".join(out)
