"""Checked reads of a card's ``params``: one clear ModelCardError per bad value, for every family."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from qpbridge.errors import ModelCardError


def int_param(params: dict[str, Any], key: str, default: int, minimum: int) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelCardError(f"card parameter '{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def float_param(params: dict[str, Any], key: str, default: float, minimum: float) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ModelCardError(f"card parameter '{key}' must be a number >= {minimum}, got {value!r}")
    return float(value)


def bool_param(params: dict[str, Any], key: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise ModelCardError(f"card parameter '{key}' must be true or false, got {value!r}")
    return value


def choice_param(params: dict[str, Any], key: str, choices: Sequence[str], default: str, family: str = "") -> str:
    """One of ``choices`` (``default`` when absent); ``family`` names the card's family in the error."""
    value = params.get(key, default)
    if value not in choices:
        who = f"{family} card" if family else "card"
        raise ModelCardError(f"{who} parameter '{key}' must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def object_param(params: dict[str, Any], key: str, known: Iterable[str], family: str) -> dict[str, Any]:
    """A nested object of the params (``{}`` when absent) whose keys must all be ``known``."""
    value = params.get(key, {})
    if not isinstance(value, dict):
        raise ModelCardError(f"{family} card parameter '{key}' must be an object")
    unknown = set(value) - set(known)
    if unknown:
        raise ModelCardError(f"unknown key(s) in {family} card parameter '{key}': {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(sorted(known))})")
    return value
