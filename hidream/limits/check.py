"""The one check helper: bounds as ``Range``, and one message format for every refusal.

``problem`` writes ``<field>: got <value>; allowed: <what>``; ``check_int``, ``check_number``
and ``check_choice`` raise it (TypeError for a wrong type, ValueError for a value outside),
and the Runware validator collects the same lines instead of raising at the first.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def _number(x: float) -> str:
    """``100`` for 100.0, ``0.1`` for 0.1, every digit of a large int (seeds)."""
    return str(x) if isinstance(x, int) else f"{x:g}"


@dataclass(frozen=True)
class Range:
    """A closed interval of numbers; ``step`` > 1 means only multiples of it (sizes)."""

    lo: float
    hi: float | None = None  # None: no upper bound
    step: int = 1

    def __contains__(self, value: float) -> bool:
        inside = self.lo <= value and (self.hi is None or value <= self.hi)
        return inside and (self.step == 1 or value % self.step == 0)

    def describe(self, integer: bool) -> str:
        kind = "an integer" if integer else "a number"
        if self.hi is None:
            return f"{kind} >= {_number(self.lo)}"
        multiple = f", a multiple of {self.step}" if self.step > 1 else ""
        return f"{kind} from {_number(self.lo)} to {_number(self.hi)}{multiple}"

    def nearest(self, value: Any) -> str:
        """`` (nearest: a or b)`` for a number in range that is off the step grid, else ``""``."""
        if not is_number(value) or self.step == 1 or value % self.step == 0:
            return ""
        if value < self.lo or (self.hi is not None and value > self.hi):
            return ""
        lower = int(value // self.step * self.step)
        return f" (nearest: {max(lower, int(self.lo))} or {lower + self.step})"


def show(value: Any) -> str:
    """A value for an error message, short enough to read (JSON spelling for JSON values)."""
    plain = isinstance(value, str | bool | int | float | type(None))
    text = json.dumps(value) if plain else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def problem(field: str, value: Any, allowed: str, missing: bool = False) -> str:
    """The one message format: ``<field>: got <value>; allowed: <what>``."""
    got = "missing" if missing else f"got {show(value)}"
    return f"{field}: {got}; allowed: {allowed}"


def suggest(value: Any, allowed: Sequence[str]) -> str | None:
    """The allowed name the user probably meant: same letters in another case, else a close spelling."""
    text = str(value)
    same = [name for name in allowed if name.lower() == text.lower()]
    close = difflib.get_close_matches(text, list(allowed), n=1, cutoff=0.7)
    return (same or close or [None])[0]


def as_int(value: Any) -> int | None:
    """An int from a JSON number; integral floats count, booleans never do."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, int) or math.isfinite(value)  # huge ints overflow isfinite


def check_int(field: str, value: Any, bounds: Range, note: str = "") -> int:
    """``value`` if it is a Python int inside ``bounds``; TypeError / ValueError otherwise."""
    allowed = bounds.describe(integer=True) + note
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(problem(field, value, allowed))
    if value not in bounds:
        raise ValueError(problem(field, value, allowed))
    return value


def check_number(field: str, value: Any, bounds: Range, note: str = "") -> float:
    """``float(value)`` if it is a finite number inside ``bounds``; TypeError / ValueError otherwise."""
    allowed = bounds.describe(integer=False) + note
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(problem(field, value, allowed))
    if not is_number(value) or value not in bounds:  # NaN and infinities are values out of range
        raise ValueError(problem(field, value, allowed))
    return float(value)


def describe_choices(choices: Sequence[str], value: Any = None) -> str:
    """``one of a, b, c`` (a count when there are many), with a did-you-mean for ``value``."""
    listed = ", ".join(choices) if len(choices) <= 8 else f"one of the {len(choices)} allowed names"
    hint = suggest(value, choices) if value is not None else None
    text = f"one of {listed}" if len(choices) <= 8 else listed
    return text + (f" (did you mean {hint!r}?)" if hint else "")


def check_choice(field: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``; ValueError naming them otherwise."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(problem(field, value, describe_choices(choices, value)))
    return value
