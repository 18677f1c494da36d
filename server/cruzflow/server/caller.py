"""Who makes the call being served, for the audit entries of the calls that
record it (RepairInstance, an audited RestartInstance).

The transports set these for each call, in the call's own context: the auth
gate the token's name, the servicers the peer's address. The handlers read
them; the engine is given them as plain arguments.
"""

from __future__ import annotations

from contextvars import ContextVar

ANONYMOUS = "anonymous"
"""The actor of a call to a server without authentication."""

TOKEN: ContextVar[str | None] = ContextVar("cruzflow_caller_token", default=None)
"""The name of the token the call was made with; None without authentication."""

PEER: ContextVar[str] = ContextVar("cruzflow_caller_peer", default="")
"""The caller's address as the transport saw it ("" when unknown)."""


def actor() -> str:
    """The token's name, or ``ANONYMOUS``."""
    return TOKEN.get() or ANONYMOUS


def peer() -> str:
    return PEER.get()
