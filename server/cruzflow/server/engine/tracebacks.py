"""Tracebacks kept with errors: where a step's attempt or a run failed.

Stored beside the error's name and message (step rows, the instance, the
events of the watch stream), so they are bounded: the end of a traceback
(the frame that raised, and the exception) is what tells most, so past the
bound the middle goes.
"""

from __future__ import annotations

import traceback
from types import TracebackType

MAX_TRACEBACK_BYTES = 8 * 1024
"""Longest traceback kept, in UTF-8 bytes."""

_HEAD_BYTES = 512


def format_error(exc: BaseException, skip: int = 1, limit: int = MAX_TRACEBACK_BYTES) -> str:
    """``exc``'s traceback as Python prints it (chained causes included), without
    its first ``skip`` frames (the engine's own frame that called the code),
    at most ``limit`` bytes."""
    tb: TracebackType | None = exc.__traceback__
    for _ in range(skip):
        if tb is None or tb.tb_next is None:
            break
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return bound(text, limit)


def bound(text: str, limit: int = MAX_TRACEBACK_BYTES) -> str:
    """``text`` cut to at most ``limit`` bytes: its start and its end, with a
    line saying how much of the middle went."""
    data = text.encode()
    if len(data) <= limit:
        return text
    head = data[: min(_HEAD_BYTES, limit // 4)].decode(errors="ignore")
    head = head[: head.rfind("\n") + 1] if "\n" in head else head
    note = f"  ... ({len(data):,} bytes in all; the middle is left out) ...\n"
    room = limit - len(head.encode()) - len(note.encode())
    tail = data[len(data) - max(room, 0) :].decode(errors="ignore")
    newline = tail.find("\n")
    if 0 <= newline < len(tail) - 1:
        tail = tail[newline + 1 :]
    return head + note + tail
