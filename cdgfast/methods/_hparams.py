"""Declared hyperparameters: what values each key of a method's `defaults` accepts.

Every method declares, next to its `defaults`, a `specs` dict with one `HP` per key (type, range,
choices, whether None is allowed). `Method.__init__` checks the merged configuration against them, so
`create(name, **overrides)`, the constructors and the driver's `--set` refuse a bad value before any
work starts, with a ValueError naming the key and the values it accepts. Values are normalised
(an int given for a float key becomes a float, a sequence of names becomes a tuple) so that a
configuration, and the run fingerprints built from it, do not depend on how a number was typed.

A key without a spec passes unchecked (a user's own Method subclass); `tests/test_methods.py` makes
sure every built-in method declares every key.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Optional, Sequence


class HP:
    """One hyperparameter's accepted values.

    kind: "float" (finite real; an int is accepted and stored as float), "int", "bool", "choice"
    (one of `choices`), "str" (a non-empty string) or "names" (a non-empty sequence of non-empty
    strings, stored as a tuple; one string is one name). lo / hi bound numbers (`lo_open` / `hi_open`:
    strict). none: None allowed (`none_means` says what None stands for)."""

    __slots__ = ("kind", "lo", "hi", "lo_open", "hi_open", "choices", "none", "none_means")

    def __init__(self, kind: str, *, lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
                 hi_open: bool = False, choices: Sequence[Any] = (), none: bool = False, none_means: str = ""):
        if kind not in ("float", "int", "bool", "choice", "str", "names"):
            raise ValueError(f"kind: expected float, int, bool, choice, str or names, got {kind!r}")
        if kind == "choice" and not choices:
            raise ValueError("choices: expected at least one choice for kind 'choice'")
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open = kind, lo, hi, lo_open, hi_open
        self.choices, self.none, self.none_means = tuple(choices), none, none_means

    def describe(self) -> str:
        """The accepted values in words, e.g. "a number >= 0", "an integer >= 1 or None (the whole task)"."""
        if self.kind == "bool":
            text = "True or False"
        elif self.kind == "choice":
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind == "str":
            text = "a non-empty string"
        elif self.kind == "names":
            text = "a non-empty sequence of module names (strings)"
        else:
            noun = "a number" if self.kind == "float" else "an integer"
            if self.lo is not None and self.hi is not None:
                text = (f"{noun} in {'(' if self.lo_open else '['}{_num(self.lo)}, "
                        f"{_num(self.hi)}{')' if self.hi_open else ']'}")
            elif self.lo is not None:
                text = f"{noun} {'>' if self.lo_open else '>='} {_num(self.lo)}"
            elif self.hi is not None:
                text = f"{noun} {'<' if self.hi_open else '<='} {_num(self.hi)}"
            else:
                text = f"a finite {noun[2:]}" if self.kind == "float" else noun
        if self.none:
            text += " or None" + (f" ({self.none_means})" if self.none_means else "")
        return text

    def check(self, key: str, value: Any, method: str = "") -> Any:
        """`value` normalised, or ValueError "key: expected <describe()> (...), got value"."""
        if value is None:
            if self.none:
                return None
            return self._fail(key, value, method)
        if self.kind == "bool":
            return value if isinstance(value, bool) else self._fail(key, value, method)
        if self.kind == "choice":
            return value if any(value == c and type(value) is type(c) for c in self.choices) \
                else self._fail(key, value, method)
        if self.kind == "str":
            return value if isinstance(value, str) and value else self._fail(key, value, method)
        if self.kind == "names":
            names = (value,) if isinstance(value, str) else value
            if not isinstance(names, (list, tuple)) or not names \
                    or not all(isinstance(n, str) and n for n in names):
                return self._fail(key, value, method)
            return tuple(names)
        if isinstance(value, bool):  # True is an Integral, but never a sensible number here
            return self._fail(key, value, method)
        if self.kind == "int":
            if not isinstance(value, numbers.Integral):
                return self._fail(key, value, method)
            value = int(value)
        else:
            if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
                return self._fail(key, value, method)
            value = float(value)
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return self._fail(key, value, method)
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return self._fail(key, value, method)
        return value

    def _fail(self, key, value, method):
        where = f" for method {method!r}" if method else ""
        raise ValueError(f"{key}: expected {self.describe()}{where}, got {value!r}")

    def __repr__(self):
        return f"HP({self.describe()})"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(v)


# The shapes that recur across methods.
def nonneg(**kw) -> HP:
    """A weight: a finite number >= 0 (0 switches the term off)."""
    return HP("float", lo=0.0, **kw)


def positive(**kw) -> HP:
    """A finite number > 0 (temperatures, learning rates)."""
    return HP("float", lo=0.0, lo_open=True, **kw)


def count(lo: int = 1, **kw) -> HP:
    """An integer >= lo."""
    return HP("int", lo=lo, **kw)


def flag() -> HP:
    return HP("bool")


def probability() -> HP:
    """A probability in [0, 1) (label dropout: 1 would never show a label)."""
    return HP("float", lo=0.0, hi=1.0, hi_open=True)


def _merged(cls: type, attr: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        out.update(getattr(klass, attr, {}) or {})
    return out


def merged_defaults(cls: type) -> Dict[str, Any]:
    """`defaults` of `cls` and its bases, later classes winning: the configuration before overrides."""
    return _merged(cls, "defaults")


def merged_specs(cls: type) -> Dict[str, HP]:
    """`specs` of `cls` and its bases, later classes winning (as `defaults` merge)."""
    return _merged(cls, "specs")


def validate_config(cls: type, config: Dict[str, Any]) -> Dict[str, Any]:
    """`config` with every declared key checked and normalised (ValueError naming the first bad key)."""
    specs = merged_specs(cls)
    name = getattr(cls, "name", cls.__name__)
    return {k: (specs[k].check(k, v, name) if k in specs else v) for k, v in config.items()}


__all__ = ["HP", "nonneg", "positive", "count", "flag", "probability", "merged_defaults", "merged_specs",
           "validate_config"]
