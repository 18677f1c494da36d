"""How calls are retried: the policy, and the one loop that applies it."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from cruzflow.client.errors import InvalidArgument

__all__ = ["RetryPolicy"]

T = TypeVar("T")

_DEFAULT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how often a call that may be repeated safely is tried again.

    A call is tried at most ``max_attempts`` times in all (1: never retried).
    Before retry *n* the client sleeps ``initial_backoff * multiplier**(n-1)``
    seconds, capped at ``max_backoff``, less a random share of up to
    ``jitter`` of it (so that many clients do not retry in step). Only
    failures whose code is in ``retryable_codes`` are retried: by default
    ``UNAVAILABLE`` (the server is unreachable or shutting down) and
    ``CANCELLED`` (the server documents both as "not done, retry").

    Which calls are retried at all is fixed by what is safe to repeat; see
    :class:`cruzflow.client.Client`.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2
    retryable_codes: AbstractSet[grpc.StatusCode] = field(default=_DEFAULT_CODES)

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            problems.append(f"max_attempts must be an int of at least 1, got {self.max_attempts!r}")
        if not self.initial_backoff >= 0:
            problems.append(f"initial_backoff must be 0 or more, got {self.initial_backoff!r}")
        if not self.max_backoff >= self.initial_backoff:
            problems.append(
                f"max_backoff must be at least initial_backoff ({self.initial_backoff!r}), "
                f"got {self.max_backoff!r}"
            )
        if not self.multiplier >= 1:
            problems.append(f"multiplier must be 1 or more, got {self.multiplier!r}")
        if not 0 <= self.jitter <= 1:
            problems.append(f"jitter must be between 0 and 1, got {self.jitter!r}")
        if not all(isinstance(code, grpc.StatusCode) for code in self.retryable_codes):
            problems.append("retryable_codes must hold grpc.StatusCode members")
        if problems:
            raise InvalidArgument("RetryPolicy: " + "; ".join(problems))
        # A set given by the caller is frozen, so the policy stays hashable.
        object.__setattr__(self, "retryable_codes", frozenset(self.retryable_codes))

    def backoff(self, retry: int) -> float:
        """Seconds to sleep before retry number ``retry`` (1 for the first retry)."""
        delay = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        return delay * (1 - self.jitter * random.random())

    def retries(self, code: grpc.StatusCode, attempt: int) -> bool:
        """Whether a failure with ``code`` on attempt number ``attempt`` is tried again."""
        return code in self.retryable_codes and attempt < self.max_attempts


async def call_with_retry(
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy | None,
    *,
    on_retry: Callable[[], None] | None = None,
    stopped: Callable[[], bool] = lambda: False,
) -> T:
    """Await ``attempt()`` until it succeeds, or fails for good under ``policy``.

    Raises the last ``grpc.aio.AioRpcError``; callers map it. ``on_retry`` is
    called before each retry; ``stopped`` ends the retries (the client was closed).
    """
    number = 0
    while True:
        number += 1
        try:
            return await attempt()
        except grpc.aio.AioRpcError as exc:
            if policy is None or stopped() or not policy.retries(exc.code(), number):
                raise
        if on_retry is not None:
            on_retry()
        await asyncio.sleep(policy.backoff(number))
