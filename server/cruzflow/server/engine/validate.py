"""Checks of the request fields a caller controls, for the engine's entry points.

Every check raises ``InvalidArgument`` whose message starts with the field's
name and says how to mend it. Messages quote a caller's value only clipped
(``clip``): the message travels back in a gRPC trailer, and a client drops a
trailer of more than a few KiB, so an echoed 4 MiB value would turn a clear
INVALID_ARGUMENT into an opaque RESOURCE_EXHAUSTED.

Nothing here recurses on the caller's data: the JSON depth check is a linear
scan, done before ``json.loads`` so that the parser never sees nesting deeper
than the limit.
"""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Any

from cruzflow.server.engine.errors import InvalidArgument

# The pattern of a workflow's name in the config ([[workflows]] name).
WORKFLOW_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
# C0 and C1 control characters: invisible in logs and in grpcurl's output, and
# never what a caller meant in a key or an event type.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Most characters of a caller's value quoted back in a message.
CLIP = 100
# Most UTF-8 bytes of a status message: gRPC percent-encodes it (up to 3
# bytes per byte) into a trailer, and clients refuse trailers over 8 KiB.
MAX_MESSAGE_BYTES = 2000

# google.protobuf.Duration's range (about 10,000 years) and its nanos bound.
_MAX_DURATION_S = 315_576_000_000
_MAX_NANOS = 999_999_999
# google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_MIN_TIMESTAMP_S = -62_135_596_800
_MAX_TIMESTAMP_S = 253_402_300_799

# JSON text with every string removed: after escapes are dropped, a string is
# a quote, anything but a quote, a quote. Linear, with no backtracking.
_STRING = re.compile(rb'"[^"]*"')
# Brackets only, with ``{`` read as ``[`` and ``}`` as ``]``.
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def clip(value: str, limit: int = CLIP) -> str:
    """``repr(value)``, cut to about ``limit`` characters, for a message."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value):,} characters)"


def fit(message: str) -> str:
    """The message cut to what a gRPC trailer carries safely."""
    data = message.encode()
    if len(data) <= MAX_MESSAGE_BYTES:
        return message
    cut = data[: MAX_MESSAGE_BYTES - 40].decode(errors="ignore")
    return f"{cut} ... (message cut at {MAX_MESSAGE_BYTES} bytes)"


def json_depth_over(data: bytes, limit: int) -> bool:
    """Whether JSON text nests arrays and objects more than ``limit`` deep.

    Linear in the text and without recursion, so any input is safe. On text
    that is not JSON the answer may be wrong, but the parser refuses that
    text anyway.
    """
    # Fast path: fewer openings than the limit cannot nest deeper than it.
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    # Drop escape pairs first (``\\`` before ``\"``, left to right, as a
    # JSON reader pairs them), so no quote is left inside a string; then
    # drop the strings, whose brackets are text.
    text = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = _STRING.sub(b"", text).translate(_BRACKETS, _NOT_BRACKETS)
    if len(brackets) <= limit:
        return False
    depth = 0
    opening = ord("[")
    for byte in brackets:
        if byte == opening:
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def check_json_depth(data: bytes, field: str, limit: int) -> None:
    if json_depth_over(data, limit):
        raise InvalidArgument(
            f"{field}: arrays and objects nest more than {limit} deep "
            f"(limits.max_json_depth); flatten the structure"
        )


def check_workflow(workflow: str, field: str = "workflow") -> None:
    """A workflow name has the config's pattern (unknown ones are NotFound later)."""
    if not WORKFLOW_PATTERN.fullmatch(workflow):
        raise InvalidArgument(
            f"{field}: {clip(workflow)} is not a workflow name; a name is 1 to 100 "
            f"characters of A-Z, a-z, 0-9, '_', '.' and '-', not starting with '.' or '-' "
            f"(see ListWorkflows)"
        )


def has_control(value: str) -> bool:
    """Whether ``value`` holds a control character (which check_text refuses)."""
    return _CONTROL.search(value) is not None


def check_text(value: str, field: str, limit: int, setting: str, *, required: bool) -> None:
    """A free-form key: length in bounds and no control characters."""
    if required and not value:
        raise InvalidArgument(f"{field}: required; send 1 to {limit} characters")
    if len(value) > limit:
        raise InvalidArgument(
            f"{field}: {len(value):,} characters, over the limit of {limit} (limits.{setting}); "
            f"send a shorter one"
        )
    control = _CONTROL.search(value)
    if control is not None:
        raise InvalidArgument(
            f"{field}: {clip(value)} holds the control character "
            f"U+{ord(control.group()):04X} at {control.start()}; use printable characters only"
        )


def duration_s(seconds: int, nanos: int, field: str) -> float:
    """A google.protobuf.Duration in seconds; it must be valid and not negative."""
    if not (-_MAX_DURATION_S <= seconds <= _MAX_DURATION_S and -_MAX_NANOS <= nanos <= _MAX_NANOS):
        raise InvalidArgument(
            f"{field}: seconds must be within +-{_MAX_DURATION_S:,} and nanos within "
            f'+-{_MAX_NANOS:,}; send a duration such as "30s"'
        )
    if (seconds > 0 and nanos < 0) or (seconds < 0 and nanos > 0):
        raise InvalidArgument(
            f"{field}: seconds ({seconds}) and nanos ({nanos}) have opposite signs; "
            f"a duration's parts share its sign"
        )
    if seconds < 0 or nanos < 0:
        raise InvalidArgument(
            f"{field}: must not be negative, got {seconds + nanos / 1e9:g} s; send 0 or more, "
            f"or leave it unset to wait until the instance is final"
        )
    return seconds + nanos / 1e9


def timestamp_ms(seconds: int, nanos: int, field: str) -> int:
    """A google.protobuf.Timestamp in ms since the epoch; it must be valid."""
    if not 0 <= nanos <= _MAX_NANOS:
        raise InvalidArgument(
            f"{field}: nanos {nanos} is out of range; use 0 to {_MAX_NANOS:,} "
            f"(a time before the epoch has negative seconds, not negative nanos)"
        )
    if not _MIN_TIMESTAMP_S <= seconds <= _MAX_TIMESTAMP_S:
        raise InvalidArgument(f"{field}: out of range; use a time from year 1 to year 9999 (UTC)")
    return seconds * 1000 + nanos // 1_000_000


def _reject_constant(value: str) -> Any:
    raise ValueError(f"{value} is not JSON")


def _finite(value: str) -> float:
    number = float(value)
    if math.isinf(number):
        raise ValueError(f"{value} is too large for a 64-bit float")
    return number


@functools.cache
def _decoder() -> json.JSONDecoder:
    """The one decoder of every check: ``json.loads`` with arguments makes a
    new one per call (this is the same parse, as json.loads does it)."""
    return json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite)


def parse_json_field(text: str | bytes, field: str, limit: int, max_depth: int = 64) -> bytes:
    """Check that a request field is JSON within the size and depth limits; return
    its bytes."""
    data = text.encode() if isinstance(text, str) else text
    if not data.strip():
        return b"null"
    if len(data) > limit:
        raise InvalidArgument(
            f"{field}: {len(data):,} bytes, over the limit of {limit:,} bytes "
            f"(limits.max_payload_bytes); pass a reference to large data instead"
        )
    # Checked first, by a linear scan: the parser recurses per level.
    check_json_depth(data, field, max_depth)
    try:
        _decoder().decode(data.decode(json.detect_encoding(data), "surrogatepass"))
    except ValueError as exc:
        raise InvalidArgument(
            f'{field}: not valid JSON ({exc}); send JSON text such as {{"a": 1}}'
        ) from None
    return data
