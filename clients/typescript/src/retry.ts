/**
 * How calls are retried: the policy, and the one loop that applies it.
 *
 * @module
 */

import { Code } from "@connectrpc/connect";
import { CruzflowError, InvalidArgument } from "./errors.js";

/**
 * When and how often a call that may be repeated safely is tried again.
 *
 * A call is tried at most `maxAttempts` times in all (1: never retried).
 * Before retry *n* the client sleeps `initialBackoffMs * multiplier ** (n-1)`,
 * capped at `maxBackoffMs`, less a random share of up to `jitter` of it (so
 * that many clients do not retry in step). Only failures whose code is in
 * `retryableCodes` are retried: by default `Unavailable` (the server is out
 * of reach or shutting down) and `Canceled` (which the server answers while
 * it stops: "not done, retry"); a call the caller aborted is never retried.
 *
 * Which calls are retried at all is fixed by what is safe to repeat; see
 * {@link ClientOptions.retry}.
 */
export interface RetryPolicy {
  readonly maxAttempts: number;
  readonly initialBackoffMs: number;
  readonly maxBackoffMs: number;
  readonly multiplier: number;
  readonly jitter: number;
  readonly retryableCodes: readonly Code[];
}

/** The policy of reads, creates with an id, and pause/resume/terminate. */
export const DEFAULT_RETRY: RetryPolicy = Object.freeze({
  maxAttempts: 5,
  initialBackoffMs: 100,
  maxBackoffMs: 5000,
  multiplier: 2,
  jitter: 0.2,
  retryableCodes: Object.freeze([Code.Unavailable, Code.Canceled]),
});

/**
 * The policy of `watch()`, `watchMany()` and `wait()`/`result()`, which
 * outlive a server restart: up to 30 failed reconnections in a row (about
 * 50 s of trying).
 */
export const DEFAULT_RECONNECT: RetryPolicy = Object.freeze({
  ...DEFAULT_RETRY,
  maxAttempts: 30,
  maxBackoffMs: 2000,
});

/** A policy from the defaults and the fields given; checks every field. */
export function retryPolicy(fields: Partial<RetryPolicy> = {}, base = DEFAULT_RETRY): RetryPolicy {
  const policy = { ...base, ...fields };
  const problems: string[] = [];
  if (!Number.isInteger(policy.maxAttempts) || policy.maxAttempts < 1) {
    problems.push(`maxAttempts must be an integer of at least 1, got ${policy.maxAttempts}`);
  }
  if (!(policy.initialBackoffMs >= 0)) {
    problems.push(`initialBackoffMs must be 0 or more, got ${policy.initialBackoffMs}`);
  }
  if (!(policy.maxBackoffMs >= policy.initialBackoffMs)) {
    problems.push(`maxBackoffMs must be at least initialBackoffMs, got ${policy.maxBackoffMs}`);
  }
  if (!(policy.multiplier >= 1)) {
    problems.push(`multiplier must be 1 or more, got ${policy.multiplier}`);
  }
  if (!(policy.jitter >= 0 && policy.jitter <= 1)) {
    problems.push(`jitter must be between 0 and 1, got ${policy.jitter}`);
  }
  if (problems.length > 0) {
    throw new InvalidArgument(`RetryPolicy: ${problems.join("; ")}`);
  }
  return Object.freeze({ ...policy, retryableCodes: Object.freeze([...policy.retryableCodes]) });
}

/** Milliseconds to sleep before retry number `retry` (1 for the first). */
export function backoffMs(policy: RetryPolicy, retry: number): number {
  const delay = Math.min(
    policy.maxBackoffMs,
    policy.initialBackoffMs * policy.multiplier ** (retry - 1),
  );
  return delay * (1 - policy.jitter * Math.random());
}

/** Whether a failure on attempt number `attempt` is tried again. */
export function retries(
  policy: RetryPolicy | null,
  error: CruzflowError,
  attempt: number,
  signal?: AbortSignal,
): boolean {
  return (
    policy !== null &&
    !signal?.aborted &&
    error.code !== undefined &&
    policy.retryableCodes.includes(error.code) &&
    attempt < policy.maxAttempts
  );
}

/** Resolves after `ms`, or rejects at once when `signal` aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(aborted(signal));
      return;
    }
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(aborted(signal));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/** The error a call ends with when the caller's signal aborted it. */
export function aborted(signal: AbortSignal | undefined, instanceId?: string): CruzflowError {
  return new CruzflowError("the call was aborted by its signal", {
    code: Code.Canceled,
    instanceId,
    cause: signal?.reason,
  });
}

/**
 * Awaits `attempt()` until it succeeds, or fails for good under `policy`
 * (`null`: never retried). `attempt` throws CruzflowErrors; `onRetry` is
 * called before each retry.
 */
export async function callWithRetry<T>(
  attempt: () => Promise<T>,
  policy: RetryPolicy | null,
  options: { signal?: AbortSignal | undefined; onRetry?: () => void } = {},
): Promise<T> {
  for (let number = 1; ; number++) {
    try {
      return await attempt();
    } catch (error) {
      if (!(error instanceof CruzflowError) || !retries(policy, error, number, options.signal)) {
        throw error;
      }
    }
    options.onRetry?.();
    // retries() is false for a null policy, so one is set here.
    await sleep(backoffMs(policy as RetryPolicy, number), options.signal);
  }
}
