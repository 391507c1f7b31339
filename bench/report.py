"""Figures, their baselines and targets; the table and the JSON file.

A figure holds one sample per repetition (or per kill, for recovery); the
table shows its median and spread (min-max) and its ratio against a baseline
figure measured in the same run: ``ratio = median / baseline median``.
"""

from __future__ import annotations

import json
import math
import operator
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bench.harness import median, percentile

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, "<": operator.lt, ">": operator.gt,
}


@dataclass
class Figure:
    key: str
    label: str
    unit: str
    samples: list[float]
    baseline: str | None = None  # key of the figure this one is divided by
    target: str | None = None  # e.g. ">=2500"; "<=1.2x" is on the ratio to the baseline
    note: str = ""
    spread: str = "min-max"  # or "IQR" (for per-event samples such as kills)

    @property
    def median(self) -> float:
        return median(self.samples)

    @property
    def low_high(self) -> tuple[float, float]:
        if not self.samples:
            return math.nan, math.nan
        if self.spread == "IQR":
            return percentile(self.samples, 25), percentile(self.samples, 75)
        return min(self.samples), max(self.samples)

    def target_met(self, ratio: float | None = None) -> bool | None:
        """Whether the median meets the target; a target ending in "x" is met
        by ``ratio``, the median over the baseline's."""
        if not self.target or not self.samples:
            return None
        value: float | None = self.median
        bound = self.target
        if bound.endswith("x"):
            value, bound = ratio, bound[:-1]
            if value is None:
                return None
        for sym in (">=", "<=", "<", ">"):
            if bound.startswith(sym):
                return _OPS[sym](value, float(bound[len(sym):]))
        return None


@dataclass
class Report:
    figures: dict[str, Figure] = field(default_factory=dict)
    scenarios: dict[str, dict[str, Any]] = field(default_factory=dict)  # per scenario: seconds, config, notes
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, figure: Figure) -> Figure:
        self.figures[figure.key] = figure
        return figure

    def value(self, key: str) -> float | None:
        fig = self.figures.get(key)
        return fig.median if fig is not None and fig.samples else None

    def ratio(self, figure: Figure) -> float | None:
        if figure.baseline is None:
            return None
        base = self.value(figure.baseline)
        if base is None or base == 0 or not figure.samples:
            return None
        return figure.median / base

    # ------------------------------------------------------------ output

    def rows(self) -> list[list[str]]:
        rows = [["figure", "median", "spread", "unit", "ratio", "baseline", "target"]]
        for fig in self.figures.values():
            lo, hi = fig.low_high
            ratio = self.ratio(fig)
            base = self.figures.get(fig.baseline or "")
            met = fig.target_met(self.ratio(fig))
            rows.append([
                fig.label,
                fmt(fig.median),
                f"{fmt(lo)}-{fmt(hi)}" + (" IQR" if fig.spread == "IQR" else ""),
                fig.unit,
                "-" if ratio is None else f"{ratio:.3g}x",
                "-" if base is None else base.label if fig.baseline != fig.key else "(itself)",
                "" if fig.target is None else f"{fig.target} {'met' if met else 'MISSED'}",
            ])
        return rows

    def table(self) -> str:
        rows = self.rows()
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def markdown(self) -> str:
        rows = self.rows()
        out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows[1:]]
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        figures = []
        for fig in self.figures.values():
            entry = asdict(fig)
            lo, hi = fig.low_high
            ratio = self.ratio(fig)
            entry.update(median=fig.median, low=lo, high=hi, ratio=ratio, target_met=fig.target_met(ratio))
            figures.append(entry)
        return {"meta": self.meta, "scenarios": self.scenarios, "figures": figures}

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")

    @classmethod
    def read(cls, path: Path) -> Report:
        data = json.loads(path.read_text())
        names = {f.name for f in fields(Figure)}
        report = cls(scenarios=data.get("scenarios", {}), meta=data.get("meta", {}))
        for entry in data.get("figures", []):
            report.add(Figure(**{k: v for k, v in entry.items() if k in names}))
        return report


def fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def main() -> None:
    """``python -m bench.report [results.json] [--markdown]``: the table again."""
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    path = Path(args[0]) if args else Path(__file__).resolve().parent / "results" / "latest.json"
    report = Report.read(path)
    print(report.markdown() if "--markdown" in sys.argv else report.table())


if __name__ == "__main__":
    main()
