"""``ctx.step`` is typed: mypy (strict, as in CI) over tests/unit/typing_cases/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mypy import api

ROOT = Path(__file__).resolve().parents[2]
CASES = Path(__file__).parent / "typing_cases"
_MARK = re.compile(r"#\s*(revealed|error):\s*(.+?)\s*$")


def _expected(case: Path) -> dict[int, tuple[str, str]]:
    """Line number -> (kind, what) from the case's end-of-line markers."""
    marks = {}
    for number, line in enumerate(case.read_text().splitlines(), 1):
        if match := _MARK.search(line):
            marks[number] = (match.group(1), match.group(2))
    return marks


def _mypy(case: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """mypy's lines about ``case``, with the import name ``intentd`` shown to it
    as scripts/typecheck.sh does (mypy does not read setuptools' package-dir)."""
    tree = tmp_path / "tree"
    (tree / "intentd").mkdir(parents=True)
    for package in ("core", "generated", "agent"):
        (tree / "intentd" / package).symlink_to(ROOT / package)
    (tree / case.name).write_text(case.read_text())
    monkeypatch.chdir(tree)
    out, err, _ = api.run([
        "--config-file", str(ROOT / "pyproject.toml"), "--namespace-packages", "--explicit-package-bases",
        "--cache-dir", str(tmp_path / "cache"), "--no-error-summary", "--show-error-codes", case.name,
    ])
    assert not err, err
    return out.splitlines()


def test_step_returns_the_step_functions_type_and_checks_its_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = CASES / "step_types.py"
    expected = _expected(case)
    assert {kind for kind, _ in expected.values()} == {"revealed", "error"}
    found: dict[int, list[str]] = {}
    for line in _mypy(case, tmp_path, monkeypatch):
        match = re.match(rf"{case.name}:(\d+): (note|error): (.*)$", line)
        if match is None:
            continue  # the notes listing an overload's variants
        number, level, text = int(match.group(1)), match.group(2), match.group(3)
        if level == "note" and not text.startswith("Revealed type"):
            continue
        found.setdefault(number, []).append(text)
    for number, (kind, what) in expected.items():
        texts = found.pop(number, [])
        if kind == "revealed":
            assert texts == [f'Revealed type is "{what}"'], (number, texts)
        else:
            assert len(texts) == 1 and texts[0].endswith(f"[{what}]"), (number, texts)
    assert found == {}, f"unexpected mypy output on unmarked lines: {found}"
