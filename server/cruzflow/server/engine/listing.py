"""ListInstances: the request's filters checked, and its page tokens.

Pages are keyset-paginated on the store's position of each instance, which is
creation order: a page starts just below the previous page's last instance,
so an instance created meanwhile (a higher position) never shifts, repeats or
enters a later page. A page token is the URL-safe base64 of a small JSON
object holding that position and a digest of the filters, then ``.`` and an
HMAC-SHA256 of that text under the store's own secret (``page_token_key``),
which is kept in the store so that tokens outlive a restart. A token altered
or made up by a caller fails the signature, and one used with other filters
fails the digest; either is refused rather than read as some other listing.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
from collections.abc import Sequence
from datetime import UTC, datetime

from cruzflow.server.engine import validate
from cruzflow.server.engine.errors import InvalidArgument
from cruzflow.server.engine.schedules import check_schedule_id
from cruzflow.server.records import InstanceQuery, InstanceRecord, InstanceStatus

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# Version 1 tokens were unsigned; they are refused like any foreign token.
_TOKEN_VERSION = 2
# Bytes of the HMAC kept in a token: 128 bits, far past guessing.
_MAC_BYTES = 16
# A position is a SQLite rowid: a signed 64-bit integer.
_MAX_POSITION = 2**63 - 1
_MAX_TOKEN_LENGTH = 200
_RESTART = "restart from the first page with an empty page_token"
# google.protobuf.Timestamp's range: 0001-01-01 to 9999-12-31 (UTC).
_EARLIEST_MS = -62_135_596_800_000
_LATEST_MS = 253_402_300_799_999


def query(
    workflow: str,
    statuses: Sequence[int],
    created_min: int | None,
    created_max: int | None,
    lookup_key: str,
    max_lookup_key_length: int,
    schedule_id: str = "",
) -> InstanceQuery:
    """The filters of a ListInstances request; raises InvalidArgument naming the field."""
    if workflow:
        validate.check_workflow(workflow)
    known: list[InstanceStatus] = []
    for i, value in enumerate(statuses):
        try:
            status = InstanceStatus(value)
        except ValueError:
            names = ", ".join(s.name for s in InstanceStatus)
            what = " (UNSPECIFIED)" if value == 0 else ""
            raise InvalidArgument(
                f"statuses[{i}]: {value}{what} is not a status to filter by; use {names}, "
                f"or no statuses for any"
            ) from None
        if status not in known:
            known.append(status)
    for field, bound in (("create_time_min", created_min), ("create_time_max", created_max)):
        if bound is not None and not _EARLIEST_MS <= bound <= _LATEST_MS:
            raise InvalidArgument(
                f"{field}: out of range; use a time from year 1 to year 9999 (UTC)"
            )
    if created_min is not None and created_max is not None and created_min >= created_max:
        raise InvalidArgument(
            f"create_time_min ({_iso(created_min)}) must be before create_time_max "
            f"({_iso(created_max)}); the range [min, max) is empty otherwise"
        )
    if len(lookup_key) > max_lookup_key_length:
        raise InvalidArgument(
            f"lookup_key: {len(lookup_key)} characters, over the limit of "
            f"{max_lookup_key_length} (limits.max_lookup_key_length); no instance can have it"
        )
    validate.check_text(
        lookup_key, "lookup_key", max_lookup_key_length, "max_lookup_key_length", required=False
    )
    if schedule_id:
        check_schedule_id(schedule_id)
    return InstanceQuery(
        workflow=workflow or None,
        statuses=tuple(sorted(known)),
        created_min=created_min,
        created_max=created_max,
        lookup_key=lookup_key or None,
        schedule_id=schedule_id or None,
    )


def after(q: InstanceQuery, position: int) -> InstanceQuery:
    """The same filters, from just below ``position``."""
    return dataclasses.replace(q, older_than=position)


def page_size(value: int) -> int:
    if value == 0:
        return DEFAULT_PAGE_SIZE
    if not 1 <= value <= MAX_PAGE_SIZE:
        raise InvalidArgument(
            f"page_size: {value} is out of range; use 1 to {MAX_PAGE_SIZE}, or 0 for "
            f"{DEFAULT_PAGE_SIZE}"
        )
    return value


def trim(
    rows: list[tuple[int, InstanceRecord]], size: int, budget: int
) -> tuple[list[InstanceRecord], int | None]:
    """The page out of ``size + 1`` rows read, and the position to go on from
    (None on the last page).

    A page stops early once its payloads pass ``budget`` bytes, so it fits a
    gRPC message even when each instance carries a large params or output.
    """
    page: list[InstanceRecord] = []
    last = 0
    for position, record in rows[:size]:
        cost = len(record.params) + len(record.output or b"") + len(record.error_message or "")
        if page and cost > budget:
            break
        budget -= cost
        page.append(record)
        last = position
    return page, (last if len(page) < len(rows) else None)


def _digest(q: InstanceQuery) -> str:
    filters = [
        q.workflow,
        [int(s) for s in q.statuses],
        q.created_min,
        q.created_max,
        q.lookup_key,
    ]
    if q.parent_id is not None:
        filters.append(q.parent_id)  # only then: tokens issued before it stay valid
    if q.schedule_id is not None:
        # Only when set: the tokens issued before the filter existed still hold.
        filters.append(f"schedule:{q.schedule_id}")  # tagged: never a parent_id's
    text = json.dumps(filters, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, body: str) -> bytes:
    return hmac.digest(key, body.encode(), hashlib.sha256)[:_MAC_BYTES]


def encode_token(q: InstanceQuery, position: int, key: bytes) -> str:
    body = json.dumps(
        {"v": _TOKEN_VERSION, "after": position, "f": _digest(q)}, separators=(",", ":")
    )
    text = _b64(body.encode())
    return f"{text}.{_b64(_mac(key, text))}"


def decode_token(token: str, q: InstanceQuery, key: bytes) -> int:
    """The position a token goes on from; it must be signed with ``key`` and come
    with the filters it was issued for."""
    try:
        if len(token) > _MAX_TOKEN_LENGTH or not token.isascii():
            raise ValueError("too long, or not base64")
        text, _, mac = token.partition(".")
        # Nothing of the body is read before its signature holds. Compared as
        # text: base64 decoding ignores some bits of the last character, and a
        # token must not have two spellings.
        if not hmac.compare_digest(mac, _b64(_mac(key, text))):
            raise ValueError("bad signature")
        body = json.loads(_unb64(text))
        position = body["after"]
        if body["v"] != _TOKEN_VERSION or type(position) is not int:
            raise ValueError("bad fields")
        if not 1 <= position <= _MAX_POSITION:
            raise ValueError("bad position")
        digest = body["f"]
    except (ValueError, TypeError, KeyError, binascii.Error):
        raise InvalidArgument(
            f"page_token: not a token this service issued (or it was altered); {_RESTART}"
        ) from None
    if digest != _digest(q):
        raise InvalidArgument(
            f"page_token: issued for other filters; send the same workflow, statuses, "
            f"create_time_min, create_time_max, lookup_key, parent_id and schedule_id as the "
            f"call that returned it, or {_RESTART}"
        )
    return position


def _iso(ms: int) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, ValueError, OSError):
        return f"{ms} ms since the epoch"
