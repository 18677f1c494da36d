"""Step options (retries, timeout) and the retry schedule."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cruzflow.sdk.durations import Duration, to_seconds

Backoff = Literal["constant", "linear", "exponential"]
_BACKOFFS = ("constant", "linear", "exponential")


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """How a failed step attempt is retried (Cloudflare's defaults)."""

    limit: int = 5
    """Retries after the first attempt: 0 means one attempt only."""
    delay: Duration = "10 seconds"
    """Delay before the first retry; later ones grow as ``backoff`` says."""
    backoff: Backoff = "exponential"
    """``constant`` (delay), ``linear`` (delay * n) or ``exponential`` (delay * 2**(n-1))."""


@dataclass(frozen=True, slots=True)
class StepConfig:
    """Options of one ``step.do``."""

    retries: RetryConfig = RetryConfig()
    """Retry policy for failed attempts."""
    timeout: Duration = "10 minutes"
    """Longest time one attempt may run; past it the attempt fails."""


@dataclass(frozen=True, slots=True)
class StepPolicy:
    """A StepConfig resolved to numbers, as the engine uses it."""

    max_attempts: int
    delay_s: float
    backoff: Backoff
    timeout_s: float

    def retry_delay(self, failed_attempt: int) -> float:
        """Seconds to wait after attempt number ``failed_attempt`` (from 1) failed."""
        if self.backoff == "constant":
            return self.delay_s
        if self.backoff == "linear":
            return self.delay_s * failed_attempt
        return self.delay_s * float(2 ** (failed_attempt - 1))


def _retry_from(value: RetryConfig | Mapping[str, Any] | None) -> RetryConfig:
    if value is None:
        return RetryConfig()
    if isinstance(value, RetryConfig):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(
            f"retries: expected a dict like {{'limit': 3, 'delay': '5 seconds', "
            f"'backoff': 'exponential'}} or a RetryConfig, got {type(value).__name__}"
        )
    unknown = set(value) - {"limit", "delay", "backoff"}
    if unknown:
        raise TypeError(f"retries: unknown option(s) {sorted(unknown)}; use limit, delay, backoff")
    default = RetryConfig()
    return RetryConfig(
        limit=value.get("limit", default.limit),
        delay=value.get("delay", default.delay),
        backoff=value.get("backoff", default.backoff),
    )


def resolve(
    config: StepConfig | Mapping[str, Any] | None,
    retries: RetryConfig | Mapping[str, Any] | None = None,
    timeout: Duration | None = None,
) -> StepPolicy:
    """Turn the options a workflow gave ``step.do`` into a StepPolicy.

    Raises TypeError or ValueError with a message that names the option.
    """
    if config is None:
        retry = _retry_from(retries)
        tmo: Duration = timeout if timeout is not None else StepConfig().timeout
    elif isinstance(config, StepConfig):
        retry, tmo = config.retries, config.timeout
    elif isinstance(config, Mapping):
        unknown = set(config) - {"retries", "timeout"}
        if unknown:
            raise TypeError(
                f"step config: unknown option(s) {sorted(unknown)}; use retries, timeout"
            )
        retry = _retry_from(config.get("retries"))
        tmo = config.get("timeout", StepConfig().timeout)
    else:
        raise TypeError(
            f"step config: expected a dict like {{'retries': {{...}}, 'timeout': '30 seconds'}} "
            f"or a StepConfig, got {type(config).__name__}"
        )
    if isinstance(retry.limit, bool) or not isinstance(retry.limit, int) or retry.limit < 0:
        raise ValueError(f"retries.limit: expected a whole number >= 0, got {retry.limit!r}")
    if retry.backoff not in _BACKOFFS:
        raise ValueError(f"retries.backoff: expected one of {_BACKOFFS}, got {retry.backoff!r}")
    timeout_s = to_seconds(tmo, "timeout")
    if timeout_s <= 0:
        raise ValueError(f"timeout: must be more than zero, got {tmo!r}")
    return StepPolicy(
        max_attempts=retry.limit + 1,
        delay_s=to_seconds(retry.delay, "retries.delay"),
        backoff=retry.backoff,
        timeout_s=timeout_s,
    )


DEFAULT_POLICY = resolve(None)
