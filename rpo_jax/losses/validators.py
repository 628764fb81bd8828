"""Hyperparameter validators of the loss registry: `validator(name, value) -> normalised value`, or a ValueError
naming the hyperparameter, the value and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


def number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"hyperparameter {name!r} must be a finite number, got {value!r}")
    return float(value)


def positive(name: str, value: Any) -> float:
    value = number(name, value)
    if value <= 0:
        raise ValueError(f"hyperparameter {name!r} must be > 0, got {value!r}")
    return value


def nonnegative(name: str, value: Any) -> float:
    value = number(name, value)
    if value < 0:
        raise ValueError(f"hyperparameter {name!r} must be >= 0, got {value!r}")
    return value


def interval(low: float, high: float, *, low_open: bool, high_open: bool) -> Callable[[str, Any], float]:
    def check(name: str, value: Any) -> float:
        value = number(name, value)
        ok_low = value > low if low_open else value >= low
        ok_high = value < high if high_open else value <= high
        if not (ok_low and ok_high):
            interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise ValueError(f"hyperparameter {name!r} must be in {interval}, got {value!r}")
        return value

    return check


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"hyperparameter {name!r} must be True or False, got {value!r}")
    return value


def choice(*choices: str) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if value not in choices:
            raise ValueError(f"hyperparameter {name!r} must be one of {list(choices)}, got {value!r}")
        return value

    return check


def alpha(name: str, value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        weights = tuple(nonnegative(name, w) for w in value)
    except TypeError:
        raise ValueError(
            f"hyperparameter {name!r} must be None (ARWC) or a sequence of R weights, got {value!r}"
        ) from None
    if len(weights) < 2:
        raise ValueError(f"hyperparameter {name!r} needs R >= 2 weights (one per reference), got {value!r}")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"hyperparameter {name!r} must sum to 1, got {value!r} (sum {sum(weights)})")
    return weights


def epsilon(name: str, value: Any) -> float | None:
    return None if value is None else interval(0.0, 1.0, low_open=False, high_open=False)(name, value)
