"""The rules of durable waits that every layer shares (docs/waits.md): the
kinds, the name a wait's record takes in the step sequence, and what a
signal's name and id may be. One copy, so the agent SDK, the sidecar and the
control plane cannot disagree about a replay."""

from __future__ import annotations

import re

from .limits import MAX_SIGNAL_ID_LEN, MAX_SIGNAL_NAME_LEN, MAX_STEP_NAME_LEN

SIGNAL = "SIGNAL"
HUMAN = "HUMAN"
TIME = "TIME"
# Child intents (docs/children.md): gather (ALL) or first (FIRST).
AGENT = "AGENT"
KINDS = (SIGNAL, HUMAN, TIME, AGENT)
ALL = "ALL"
FIRST = "FIRST"
CHILD_MODES = (ALL, FIRST)

# Step names starting with this are the records of waits; user steps may not.
RESERVED_PREFIX = "@"

# Human task outcomes when the handler names none.
DEFAULT_OUTCOMES = ("approve", "reject")

_TOKEN_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")


def record_name(kind: str, name: str = "") -> str:
    """The step name of a wait's record: ``@signal:<name>``, ``@sleep``,
    ``@human:<title>``, ``@gather`` (AGENT, name ALL), ``@first`` (AGENT,
    name FIRST), cut to the step name limit."""
    if kind == SIGNAL:
        full = f"{RESERVED_PREFIX}signal:{name}"
    elif kind == TIME:
        full = f"{RESERVED_PREFIX}sleep"
    elif kind == HUMAN:
        full = f"{RESERVED_PREFIX}human:{name}"
    elif kind == AGENT and name in CHILD_MODES:
        full = f"{RESERVED_PREFIX}gather" if name == ALL else f"{RESERVED_PREFIX}first"
    else:
        raise ValueError(f"unknown wait kind {kind!r}")
    return full[:MAX_STEP_NAME_LEN]


def start_record_name(intent_type: str) -> str:
    """The step name of a start's record (the ids of the children started at
    that position): ``@start:<intent type of the first child>``."""
    return f"{RESERVED_PREFIX}start:{intent_type}"[:MAX_STEP_NAME_LEN]


def signal_name_problem(name: str) -> str | None:
    """Why ``name`` is not a signal name, or None."""
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_SIGNAL_NAME_LEN:
        return f"must be 1 to {MAX_SIGNAL_NAME_LEN} characters"
    if not _TOKEN_RE.fullmatch(name):
        return "may only contain letters, digits and _ . : -"
    return None


def signal_id_problem(signal_id: str) -> str | None:
    """Why ``signal_id`` is not a signal id, or None (empty is allowed: the
    server makes one)."""
    if signal_id == "":
        return None
    if len(signal_id) > MAX_SIGNAL_ID_LEN:
        return f"must be at most {MAX_SIGNAL_ID_LEN} characters"
    if not _TOKEN_RE.fullmatch(signal_id):
        return "may only contain letters, digits and _ . : -"
    return None
