"""Durations as workflow authors write them: "5 seconds", 1500 (ms), timedelta."""

from __future__ import annotations

import re
from datetime import timedelta

Duration = str | int | float | timedelta

_UNIT_SECONDS = {
    "millisecond": 0.001,
    "second": 1.0,
    "minute": 60.0,
    "hour": 3600.0,
    "day": 86400.0,
    "week": 7 * 86400.0,
    # Calendar-free approximations, as Cloudflare's workflows use them.
    "month": 30 * 86400.0,
    "year": 365 * 86400.0,
}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+?)s?\s*$")
_cache: dict[str, float] = {}


def to_seconds(value: Duration, what: str = "duration") -> float:
    """Return a duration in seconds, or raise ValueError naming ``what``.

    Accepts ``"10 minutes"``/``"1 day"`` (singular or plural units from
    millisecond to year), a number of milliseconds, or a ``timedelta``.
    """
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a duration such as '30 seconds', got {value!r}")
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float):
        seconds = float(value) / 1000.0
    elif isinstance(value, str):
        cached = _cache.get(value)
        if cached is not None:
            return cached
        match = _PATTERN.match(value.lower())
        unit = _UNIT_SECONDS.get(match.group(2)) if match else None
        if match is None or unit is None:
            units = ", ".join(_UNIT_SECONDS)
            raise ValueError(
                f"{what}: cannot read {value!r}; write a number and a unit such as "
                f"'30 seconds' (units: {units}), a number of milliseconds, or a timedelta"
            )
        seconds = float(match.group(1)) * unit
        if len(_cache) < 1024:
            _cache[value] = seconds
    else:
        raise ValueError(
            f"{what}: expected a string such as '30 seconds', milliseconds or a timedelta, "
            f"got {type(value).__name__}"
        )
    if seconds < 0:
        raise ValueError(f"{what}: must not be negative, got {value!r}")
    return seconds
