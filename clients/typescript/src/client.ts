/**
 * The client: {@link Client}, {@link WorkflowBinding} and {@link InstanceHandle},
 * on any Connect transport (Connect over `fetch`, or gRPC on Node).
 *
 * @module
 */

import { Code, createClient as createRpcClient, type Client as RpcClient } from "@connectrpc/connect";
import type { Transport } from "@connectrpc/connect";
import { durationFromMs, timestampFromDate } from "@bufbuild/protobuf/wkt";
import * as convert from "./convert.js";
import {
  CruzflowError,
  DeadlineExceeded,
  FailedPrecondition,
  InstanceAlreadyExists,
  InstanceNotFound,
  InvalidArgument,
  ResultTimeout,
  WorkflowFailed,
  WorkflowTerminated,
  fromConnectError,
} from "./errors.js";
import * as pb from "./gen/cruzflow/v1/workflows_pb.js";
import { WorkflowService } from "./gen/cruzflow/v1/workflows_pb.js";
import {
  DEFAULT_RECONNECT,
  DEFAULT_RETRY,
  aborted,
  backoffMs,
  callWithRetry,
  retries,
  retryPolicy,
  sleep,
  type RetryPolicy,
} from "./retry.js";
import {
  isFinished,
  type CallerInfo,
  type CatchUpPolicy,
  type InstanceCounts,
  type InstanceInfo,
  type InstancePage,
  type InstanceStatus,
  type RepairInfo,
  type ScheduleInfo,
  type WatchEvent,
  type WorkflowInfo,
} from "./types.js";

/** Options of a {@link Client}, whatever its transport. */
export interface ClientOptions {
  /** Sent as `Authorization: Bearer <token>` with every call. */
  token?: string | undefined;
  /** More headers sent with every call. */
  headers?: Record<string, string> | undefined;
  /**
   * The deadline of each call in milliseconds (default 10 000; `null`: none).
   * Every method takes a `timeoutMs` of its own that overrides it.
   */
  timeoutMs?: number | null | undefined;
  /**
   * How calls that are safe to repeat are retried on `Unavailable` (`null`:
   * never); fields left out keep {@link DEFAULT_RETRY}'s. Retried are:
   *
   * - reads (`status`, `get`, `listInstances`, `listWorkflows`, `countInstances`,
   *   `caller`) always;
   * - `create`, `createMany` and `run` only when every instance has an `id`
   *   (a lost answer to a create without one may hide an instance that was
   *   stored). An `AlreadyExists` answer to such a retry is success when the
   *   instance found has the same workflow, params and lookup key (`run` then
   *   waits for it);
   * - `pause`, `resume` and `terminate`; a `FailedPrecondition` answer to a
   *   retry is success when the instance is already where the call would have
   *   put it;
   * - never `restart` nor `sendEvent`: a repeat would restart the instance
   *   again or deliver the event twice.
   */
  retry?: Partial<RetryPolicy> | null | undefined;
  /**
   * The policy of `watch()`, `watchMany()` and `wait()`/`result()`, which
   * outlive server restarts; by default they give up after 30 failed reconnections in a row
   * ({@link DEFAULT_RECONNECT}). `null`: they fail at the first cut.
   */
  reconnect?: Partial<RetryPolicy> | null | undefined;
}

/** Options every call takes. */
export interface CallOptions {
  /** This call's deadline in milliseconds, over the client's `timeoutMs` (`null`: none). */
  timeoutMs?: number | null | undefined;
  /** Aborts the call (and its retries): it then throws a `CruzflowError` with `Code.Canceled`. */
  signal?: AbortSignal | undefined;
}

/** Options of `InstanceHandle.restart`. */
export interface RestartOptions {
  /** Restart from this step (by name) instead of from scratch. */
  fromStep?: string | undefined;
  /** Which occurrence of `fromStep`: 1 (the default) for the first in a run. */
  occurrence?: number | undefined;
  /** Why: kept in the instance's history (a restart from a step is always kept). */
  reason?: string | undefined;
}

/** Options of `InstanceHandle.repair`: exactly one of `output` and `retry`. */
export interface RepairOptions {
  /** The step's new result (any JSON value; `null` too). */
  output?: unknown;
  /** Run the failed step again, afresh, with its full retries. */
  retry?: boolean | undefined;
  /** Why: required, kept in the instance's history. */
  reason: string;
  /** Which occurrence of the step: 1 (the default) for the first in a run. */
  occurrence?: number | undefined;
}

/** Filters of `listInstances` and `listInstancesPage`; each narrows. */
export interface InstanceFilter {
  /** Only instances of this workflow. */
  workflow?: string | undefined;
  /** Only instances in this status, or in one of these. */
  status?: InstanceStatus | readonly InstanceStatus[] | undefined;
  /** Only instances created at or after this time. */
  createTimeMin?: Date | undefined;
  /** Only instances created before this time. */
  createTimeMax?: Date | undefined;
  /** Only instances created with this lookup key. */
  lookupKey?: string | undefined;
  /** Only the children of this instance (started by its `step.child`). */
  parentId?: string | undefined;
  /** Only instances that this schedule created. */
  scheduleId?: string | undefined;
  /** Instances per page: 1 to 1000 (the server's default, 100, when left out). */
  pageSize?: number | undefined;
}

/** Options of `client.createSchedule`. */
export interface ScheduleOptions extends CallOptions {
  /** The params of every instance it creates (JSON-serialisable). */
  params?: unknown;
  /** The IANA time zone the cron expression is read in; default `"UTC"`. */
  timezone?: string | undefined;
  /** Missed due times: `"once"` (the default) fires the most recent, `"skip"` none. */
  catchUp?: CatchUpPolicy | undefined;
  /** Create it paused. */
  paused?: boolean | undefined;
}

/** Options of `WorkflowBinding.create`. */
export interface CreateOptions extends CallOptions {
  /**
   * Your own instance id: 1 to 100 characters of `[A-Za-z0-9_-]`, not
   * starting with `-` (the server makes one when left out). With an id the
   * create is retried on `Unavailable`: it cannot create twice.
   */
  id?: string | undefined;
  /** A key to find the instance by with `listInstances({ lookupKey })`, e.g. `"user:42"`. */
  lookupKey?: string | undefined;
  /**
   * For a workflow with a concurrency or rate limit: among the instances
   * waiting for a slot, higher starts first (0 by default).
   */
  priority?: number | undefined;
  /** For a workflow limited per key: the key to take a slot of, instead of the params'. */
  concurrencyKey?: string | undefined;
  /**
   * If the id is taken: `"error"` (the default) throws
   * {@link InstanceAlreadyExists}; `"return"` returns the existing instance of
   * this workflow, whatever its params (use it with an id derived from an
   * idempotency key).
   */
  ifExists?: "error" | "return" | undefined;
}

/** One instance to create with `WorkflowBinding.createMany`. */
export interface NewInstance<Params = unknown> {
  params?: Params;
  id?: string | undefined;
  lookupKey?: string | undefined;
  priority?: number | undefined;
  concurrencyKey?: string | undefined;
}

/** Options of `InstanceHandle.wait` and `result`. */
export interface WaitOptions {
  /**
   * How long to wait for a final status, in milliseconds; then
   * {@link ResultTimeout} is thrown (the instance goes on). Left out: as long
   * as it takes.
   */
  timeoutMs?: number | undefined;
  signal?: AbortSignal | undefined;
}

/** Options of `InstanceHandle.watch`. */
export interface WatchOptions {
  /** Resume after this sequence number (0, the default: from the first event). */
  afterSequence?: number | undefined;
  /** Bounds the whole watch: {@link DeadlineExceeded} once it has passed. */
  timeoutMs?: number | undefined;
  /** Ends the watch: the iteration then throws a `CruzflowError` with `Code.Canceled`. */
  signal?: AbortSignal | undefined;
}

/**
 * One instance of `client.watchMany` and where to resume it. An
 * {@link InstanceHandle} is one too (from its first event).
 */
export interface WatchCursor {
  /** The instance id. */
  readonly id: string;
  /** Resume after this sequence number (0, the default: from the first event). */
  readonly afterSequence?: number | undefined;
}

/** Options of `client.watchMany`. */
export interface WatchManyOptions {
  /** Bounds the whole watch: {@link DeadlineExceeded} once it has passed. */
  timeoutMs?: number | undefined;
  /** Ends the watch: the iteration then throws a `CruzflowError` with `Code.Canceled`. */
  signal?: AbortSignal | undefined;
}

/**
 * Options of `WorkflowBinding.run` and `runInfo`: those of `create` (but
 * `ifExists`), and `timeoutMs` and `signal` as `InstanceHandle.wait`'s.
 */
export interface RunOptions
  extends WaitOptions,
    Pick<CreateOptions, "id" | "lookupKey" | "priority" | "concurrencyKey"> {}

/** The most instances one `watchMany` (one WatchInstances stream) follows. */
export const MAX_WATCHED = 1000;

const DEFAULT_TIMEOUT_MS = 10_000;
// How long one WaitInstance long-poll may last on the server; wait() polls
// again until the instance is final or its own timeout passes. Short enough
// for proxies that cut idle requests.
const LONG_POLL_MS = 30_000;

type Rpc = RpcClient<typeof WorkflowService>;

function checkText(value: unknown, what: string): string {
  if (typeof value !== "string" || value === "") {
    throw new InvalidArgument(`${what}: must be a non-empty string, got ${JSON.stringify(value)}`);
  }
  return value;
}

function checkTimeout(value: unknown, what: string): number | null {
  if (value === null) {
    return null;
  }
  if (typeof value !== "number" || !(value > 0) || !Number.isFinite(value)) {
    throw new InvalidArgument(`${what}: must be a number of milliseconds over 0, got ${String(value)}`);
  }
  return value;
}

function sameJson(a: unknown, b: unknown): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}

function show(value: unknown): string {
  try {
    return JSON.stringify(value) ?? String(value);
  } catch {
    return String(value);
  }
}

/** A wait's `timeoutMs` (0 or more; `undefined`: no end) as the time it ends. */
function waitDeadline(timeoutMs: unknown): number | null {
  if (timeoutMs === undefined) {
    return null;
  }
  if (typeof timeoutMs !== "number" || !(timeoutMs >= 0)) {
    throw new InvalidArgument(`timeoutMs: must be 0 or more milliseconds, got ${String(timeoutMs)}`);
  }
  return Date.now() + timeoutMs;
}

/** How long one long poll (WaitInstance, RunInstance) may wait on the server. */
function pollMs(deadline: number | null): number {
  return deadline === null ? LONG_POLL_MS : Math.max(0, Math.min(LONG_POLL_MS, deadline - Date.now()));
}

/**
 * `client.watchMany`'s instances as id -> sequence to resume after, checked
 * as the server would (before any call): 1 to {@link MAX_WATCHED}, each once.
 */
function cursors(instances: unknown): Map<string, number> {
  const expected = "ids, handles or { id, afterSequence } cursors";
  if (typeof instances === "string") {
    throw new InvalidArgument(
      `instances: expected ${expected}, not one string (${show(instances)}); ` +
        `pass [${show(instances)}] to follow one instance`,
    );
  }
  if (typeof instances !== "object" || instances === null || !(Symbol.iterator in instances)) {
    throw new InvalidArgument(
      `instances: expected an array of ${expected}, or a Map of id to sequence, got ${show(instances)}`,
    );
  }
  const items: Iterable<unknown> =
    instances instanceof Map
      ? [...(instances as Map<unknown, unknown>)].map(([id, afterSequence]) => ({ id, afterSequence }))
      : (instances as Iterable<unknown>);
  const out = new Map<string, number>();
  let index = 0;
  for (const item of items) {
    let id: unknown;
    let after: unknown = 0;
    if (typeof item === "string") {
      id = item;
    } else if (typeof item === "object" && item !== null && "id" in item) {
      id = item.id;
      after = (item as { afterSequence?: unknown }).afterSequence ?? 0;
    } else {
      throw new InvalidArgument(
        `instances[${index}]: expected an id, a handle or an { id, afterSequence } cursor, got ${show(item)}`,
      );
    }
    const text = checkText(id, `instances[${index}].id`);
    if (typeof after !== "number" || !Number.isSafeInteger(after) || after < 0) {
      throw new InvalidArgument(
        `instances[${index}].afterSequence: must be an integer of 0 or more, got ${show(after)}`,
      );
    }
    if (out.has(text)) {
      throw new InvalidArgument(`instances[${index}]: '${text}' is listed already; list each instance once`);
    }
    out.set(text, after);
    index += 1;
  }
  if (out.size === 0) {
    throw new InvalidArgument("instances: at least one instance to watch is required");
  }
  if (out.size > MAX_WATCHED) {
    throw new InvalidArgument(
      `instances: ${out.size} listed, at most ${MAX_WATCHED} per watchMany (one WatchInstances ` +
        `stream); split them over several watchMany calls`,
    );
  }
  return out;
}

/** What `result()` and `run()` give for a final instance: its output, or the error of its end. */
function outcome<Output>(info: InstanceInfo<unknown, Output>): Output {
  if (info.status === "complete") {
    return info.output as Output;
  }
  if (info.status === "errored") {
    const error = info.error;
    throw new WorkflowFailed(info.id, error?.name ?? "UnknownError", error?.message ?? "", error?.traceback);
  }
  throw new WorkflowTerminated(info.id);
}

/**
 * A client of a cruzflow server, on a Connect transport. Make one with
 * `createClient` (Connect over `fetch`: Workers, browsers, Deno, Node) from
 * `@cruzflow/client`, or `createGrpcClient` (gRPC, Node) from
 * `@cruzflow/client/node`:
 *
 * ```ts
 * const client = createClient({ baseUrl: "http://127.0.0.1:8080" });
 * const onboarding = client.workflow<OnboardingParams, OnboardingOutput>("onboarding-workflow");
 * const instance = await onboarding.create({ userId: "42", email, plan: "pro" }, { id: "onboarding-42" });
 * console.log(await instance.result({ timeoutMs: 60_000 }));
 * ```
 */
export class Client {
  /** The deadline of each call in milliseconds; `null`: none. */
  readonly timeoutMs: number | null;
  /** How calls safe to repeat are retried; `null`: never. */
  readonly retry: RetryPolicy | null;
  /** How watches and waits reconnect; `null`: never. */
  readonly reconnect: RetryPolicy | null;
  /** @internal */
  readonly rpc: Rpc;
  readonly #headers: Record<string, string>;

  constructor(transport: Transport, options: ClientOptions = {}) {
    this.timeoutMs =
      options.timeoutMs === undefined ? DEFAULT_TIMEOUT_MS : checkTimeout(options.timeoutMs, "timeoutMs");
    this.retry = options.retry === null ? null : retryPolicy(options.retry, DEFAULT_RETRY);
    this.reconnect =
      options.reconnect === null ? null : retryPolicy(options.reconnect, DEFAULT_RECONNECT);
    const headers: Record<string, string> = { ...options.headers };
    if (options.token !== undefined) {
      headers["authorization"] = `Bearer ${checkText(options.token, "token")}`;
    }
    this.#headers = headers;
    this.rpc = createRpcClient(WorkflowService, transport);
  }

  /** The binding of the workflow `name` (no call is made). */
  workflow<Params = unknown, Output = unknown>(name: string): WorkflowBinding<Params, Output> {
    return new WorkflowBinding(this, checkText(name, "workflow"));
  }

  /** A handle on the instance `id` (no call is made; see `WorkflowBinding.get`). */
  instance<Params = unknown, Output = unknown>(id: string): InstanceHandle<Params, Output> {
    return new InstanceHandle(this, checkText(id, "instanceId"));
  }

  /**
   * Every event of several instances (1 to {@link MAX_WATCHED}) as they
   * happen, in one stream (WatchInstances), ending once every one has
   * reached its end. Those of each instance come in order, each once; the
   * instances' events interleave as they happen:
   *
   * ```ts
   * for await (const event of client.watchMany(["order-1", "order-2"])) {
   *   if (event.kind === "statusChanged" && event.isFinal) console.log(event.instanceId, event.status);
   * }
   * ```
   *
   * `instances` are ids or handles (followed from their first event),
   * `{ id, afterSequence }` cursors, or a `Map` of id to the sequence to
   * resume after; they are checked at once (an empty list, an id listed
   * twice, more than {@link MAX_WATCHED}: {@link InvalidArgument}), before
   * any call. A stream cut by the network or a server stop or restart is
   * opened again with each instance's last sequence received, leaving out
   * those whose last event was final, so no event is missed or repeated (as
   * `InstanceHandle.watch`); it gives up (throwing {@link Unavailable}) after
   * the client's `reconnect` attempts in a row that brought no event.
   * `timeoutMs` bounds the whole watch ({@link DeadlineExceeded}); `break`
   * closes the stream.
   */
  watchMany<Output = unknown>(
    instances: Iterable<string | WatchCursor> | ReadonlyMap<string, number>,
    options: WatchManyOptions = {},
  ): AsyncGenerator<WatchEvent<Output>, void, undefined> {
    const open = cursors(instances);
    const limit = options.timeoutMs === undefined ? null : checkTimeout(options.timeoutMs, "timeoutMs");
    return this.#watchMany<Output>(open, limit, options.signal);
  }

  async *#watchMany<Output>(
    open: Map<string, number>,
    limit: number | null,
    signal: AbortSignal | undefined,
  ): AsyncGenerator<WatchEvent<Output>, void, undefined> {
    const policy = this.reconnect;
    const deadline = limit === null ? null : Date.now() + limit;
    const timedOut = (cause?: unknown): DeadlineExceeded =>
      new DeadlineExceeded(`watchMany ended by its timeout with ${open.size} instances not ended yet`, {
        code: Code.DeadlineExceeded,
        cause,
      });
    // The last sequence yielded of every instance; `open` holds those whose
    // last event is not final: what a reconnection asks for (an instance that
    // ended may be purged by then).
    const lasts = new Map(open);
    let failures = 0;
    while (open.size > 0) {
      const remaining = deadline === null ? null : deadline - Date.now();
      if (remaining !== null && remaining <= 0) {
        throw timedOut();
      }
      // Our own controller, so that leaving the loop (a break, a throw)
      // closes the stream at once.
      const stop = new AbortController();
      const onAbort = (): void => stop.abort(signal?.reason);
      signal?.addEventListener("abort", onAbort, { once: true });
      if (signal?.aborted) {
        stop.abort(signal.reason);
      }
      try {
        const request = {
          instances: [...open].map(([instanceId, last]) => ({ instanceId, afterSequence: BigInt(last) })),
        };
        const stream = this.rpc.watchInstances(request, this.callOptions({ signal: stop.signal }, remaining));
        for await (const message of stream) {
          for (const item of message.events) {
            const last = lasts.get(item.instanceId);
            if (last === undefined || Number(item.sequence) <= last) {
              continue;
            }
            const event = convert.event<Output>(item);
            lasts.set(event.instanceId, event.sequence);
            if (event.kind === "statusChanged" && event.isFinal) {
              open.delete(event.instanceId);
            } else {
              // Also after a final event: a restart may follow an end.
              open.set(event.instanceId, event.sequence);
            }
            failures = 0;
            yield event;
          }
        }
        return;
      } catch (reason) {
        const error = this.mapError(reason, signal);
        failures += 1;
        if (error.code === Code.DeadlineExceeded && deadline !== null && Date.now() >= deadline) {
          throw timedOut(error);
        }
        if (!retries(policy, error, failures, signal)) {
          throw error;
        }
      } finally {
        signal?.removeEventListener("abort", onAbort);
        stop.abort();
      }
      let pause = backoffMs(policy as RetryPolicy, failures);
      if (deadline !== null) {
        pause = Math.min(pause, Math.max(0, deadline - Date.now()));
      }
      await sleep(pause, signal).catch(() => {
        throw aborted(signal);
      });
    }
  }

  /** The workflows the server hosts. */
  async listWorkflows(options: CallOptions = {}): Promise<WorkflowInfo[]> {
    const response = await this.unary(
      (o) => this.rpc.listWorkflows({}, o),
      options,
      this.retry,
    );
    return response.workflows.map(convert.workflow);
  }

  /**
   * One page of instances, newest first, without their steps. Pass the page's
   * `nextPageToken` back, with the same filters, for the next page.
   */
  async listInstancesPage(
    filter: InstanceFilter & { pageToken?: string | undefined } = {},
    options: CallOptions = {},
  ): Promise<InstancePage> {
    const statuses =
      filter.status === undefined ? [] : typeof filter.status === "string" ? [filter.status] : filter.status;
    const request = {
      workflow: filter.workflow ?? "",
      statuses: statuses.map(convert.statusToPb),
      lookupKey: filter.lookupKey ?? "",
      parentId: filter.parentId ?? "",
      scheduleId: filter.scheduleId ?? "",
      pageSize: filter.pageSize ?? 0,
      pageToken: filter.pageToken ?? "",
      ...(filter.createTimeMin && { createTimeMin: timestampFromDate(filter.createTimeMin) }),
      ...(filter.createTimeMax && { createTimeMax: timestampFromDate(filter.createTimeMax) }),
    };
    const response = await this.unary((o) => this.rpc.listInstances(request, o), options, this.retry);
    return {
      instances: response.instances.map((i) => convert.instance(i)),
      nextPageToken: response.nextPageToken,
    };
  }

  /**
   * Every instance that matches the filters, newest first, fetching page
   * after page as the iteration goes on:
   *
   * ```ts
   * for await (const info of client.listInstances({ lookupKey: "user:42" })) { ... }
   * ```
   */
  async *listInstances(
    filter: InstanceFilter = {},
    options: CallOptions = {},
  ): AsyncGenerator<InstanceInfo, void, undefined> {
    let pageToken = "";
    for (;;) {
      const page = await this.listInstancesPage({ ...filter, pageToken }, options);
      yield* page.instances;
      if (!page.nextPageToken) {
        return;
      }
      pageToken = page.nextPageToken;
    }
  }

  /**
   * How many instances there are per workflow and status, with the filters
   * of `listInstances` but the status: the figures of a dashboard, in one call.
   */
  async countInstances(
    filter: Omit<InstanceFilter, "status" | "pageSize" | "parentId"> = {},
    options: CallOptions = {},
  ): Promise<InstanceCounts> {
    const request = {
      workflow: filter.workflow ?? "",
      lookupKey: filter.lookupKey ?? "",
      ...(filter.createTimeMin && { createTimeMin: timestampFromDate(filter.createTimeMin) }),
      ...(filter.createTimeMax && { createTimeMax: timestampFromDate(filter.createTimeMax) }),
    };
    const response = await this.unary((o) => this.rpc.countInstances(request, o), options, this.retry);
    return convert.counts(response);
  }

  /**
   * Store a cron schedule: an instance of `workflow` with `params` at each due
   * time of `cron` (five fields, or six with seconds first) in `timezone`
   * (default UTC). `catchUp` (default `"once"`) says what happens to due
   * times missed while no server ran. Not retried.
   */
  async createSchedule(
    id: string,
    workflow: string,
    cron: string,
    options: ScheduleOptions = {},
  ): Promise<ScheduleInfo> {
    const catchUp = options.catchUp ?? "once";
    if (catchUp !== "once" && catchUp !== "skip") {
      throw new InvalidArgument(`catchUp: ${JSON.stringify(catchUp)} is not a catch-up policy; use "skip" or "once"`);
    }
    const request = {
      schedule: {
        scheduleId: checkText(id, "scheduleId"),
        workflow: checkText(workflow, "workflow"),
        cron,
        timezone: options.timezone ?? "UTC",
        paramsJson: convert.encodeJson(options.params, "params"),
        catchUp: catchUp === "skip" ? pb.CatchUpPolicy.SKIP : pb.CatchUpPolicy.ONCE,
        paused: options.paused ?? false,
      },
    };
    const response = await this.unary((o) => this.rpc.createSchedule(request, o), options, null);
    return convert.schedule(response.schedule);
  }

  /** The schedule `id`, with its last and next due times. */
  async getSchedule(id: string, options: CallOptions = {}): Promise<ScheduleInfo> {
    const request = { scheduleId: checkText(id, "scheduleId") };
    const response = await this.unary((o) => this.rpc.getSchedule(request, o), options, this.retry);
    return convert.schedule(response.schedule);
  }

  /** Every schedule (of `filter.workflow`, if given), by id, page after page. */
  async listSchedules(filter: { workflow?: string | undefined } = {}, options: CallOptions = {}): Promise<ScheduleInfo[]> {
    const out: ScheduleInfo[] = [];
    let pageToken = "";
    for (;;) {
      const request = { workflow: filter.workflow ?? "", pageSize: 1000, pageToken };
      const response = await this.unary((o) => this.rpc.listSchedules(request, o), options, this.retry);
      out.push(...response.schedules.map(convert.schedule));
      pageToken = response.nextPageToken;
      if (!pageToken) {
        return out;
      }
    }
  }

  /** Stop the schedule firing until `resumeSchedule` (retried: pausing twice is pausing once). */
  async pauseSchedule(id: string, options: CallOptions = {}): Promise<ScheduleInfo> {
    const request = { scheduleId: checkText(id, "scheduleId") };
    const response = await this.unary((o) => this.rpc.pauseSchedule(request, o), options, this.retry);
    return convert.schedule(response.schedule);
  }

  /** Let a paused schedule fire again, from its next due time. */
  async resumeSchedule(id: string, options: CallOptions = {}): Promise<ScheduleInfo> {
    const request = { scheduleId: checkText(id, "scheduleId") };
    const response = await this.unary((o) => this.rpc.resumeSchedule(request, o), options, this.retry);
    return convert.schedule(response.schedule);
  }

  /** Delete a schedule made through the API; its instances stay. */
  async deleteSchedule(id: string, options: CallOptions = {}): Promise<void> {
    const request = { scheduleId: checkText(id, "scheduleId") };
    await this.unary((o) => this.rpc.deleteSchedule(request, o), options, null);
  }

  /** Create an instance of the schedule now (paused or not); its handle. Not retried. */
  async triggerSchedule(id: string, options: CallOptions = {}): Promise<InstanceHandle> {
    const request = { scheduleId: checkText(id, "scheduleId") };
    const response = await this.unary((o) => this.rpc.triggerSchedule(request, o), options, null);
    return new InstanceHandle(this, response.instanceId);
  }

  /** What this client's token may do: read-only or not, and which workflows. */
  async caller(options: CallOptions = {}): Promise<CallerInfo> {
    const response = await this.unary((o) => this.rpc.getCaller({}, o), options, this.retry);
    return convert.caller(response);
  }

  /** @internal Connect's options for one call. */
  callOptions(
    options: CallOptions,
    timeoutMs: number | null = this.deadline(options.timeoutMs),
  ): { headers: Record<string, string>; timeoutMs?: number; signal?: AbortSignal } {
    return {
      headers: this.#headers,
      // Connect reads 0 as "no deadline", over a transport's default too.
      timeoutMs: timeoutMs ?? 0,
      ...(options.signal && { signal: options.signal }),
    };
  }

  /** @internal */
  deadline(timeoutMs: number | null | undefined): number | null {
    return timeoutMs === undefined ? this.timeoutMs : checkTimeout(timeoutMs, "timeoutMs");
  }

  /**
   * @internal One unary call, retried under `retry`; failures become
   * CruzflowErrors. `call` builds each attempt afresh.
   */
  async unary<T>(
    call: (options: ReturnType<Client["callOptions"]>) => Promise<T>,
    options: CallOptions,
    retry: RetryPolicy | null,
    extra: { instanceId?: string | undefined; onRetry?: () => void; timeoutMs?: number | null } = {},
  ): Promise<T> {
    const callOptions =
      extra.timeoutMs === undefined ? this.callOptions(options) : this.callOptions(options, extra.timeoutMs);
    return callWithRetry(
      async () => {
        try {
          return await call(callOptions);
        } catch (error) {
          throw this.mapError(error, options.signal, extra.instanceId);
        }
      },
      retry,
      { signal: options.signal, ...(extra.onRetry && { onRetry: extra.onRetry }) },
    );
  }

  /** @internal */
  mapError(error: unknown, signal: AbortSignal | undefined, instanceId?: string): CruzflowError {
    if (signal?.aborted) {
      return aborted(signal, instanceId);
    }
    return fromConnectError(error, instanceId);
  }
}

/**
 * One workflow of the server, to create and find its instances by; made by
 * `client.workflow(name)`. The counterpart of a Cloudflare Workflows binding
 * (`env.MY_WORKFLOW.create(...)`). `Params` and `Output` are the types of the
 * workflow's params and of what its `run` returns (not checked: JSON).
 */
export class WorkflowBinding<Params = unknown, Output = unknown> {
  readonly #client: Client;
  /** The workflow's name, e.g. `"onboarding-workflow"`. */
  readonly name: string;

  constructor(client: Client, name: string) {
    this.#client = client;
    this.name = name;
  }

  /**
   * Creates an instance; it is durably stored when this resolves, and runs.
   * `params` (any JSON value) reach `run` as `event.payload`.
   *
   * Throws {@link WorkflowNotFound} for a workflow the server does not host,
   * {@link InvalidArgument} for a bad id or params, and
   * {@link InstanceAlreadyExists} for a taken id (unless `ifExists: "return"`).
   */
  async create(params?: Params, options: CreateOptions = {}): Promise<InstanceHandle<Params, Output>> {
    const client = this.#client;
    const { id, lookupKey, ifExists = "error" } = options;
    if (ifExists !== "error" && ifExists !== "return") {
      throw new InvalidArgument(`ifExists: must be "error" or "return", got ${JSON.stringify(ifExists)}`);
    }
    const request = this.#createRequest(params, options);
    let retried = false;
    try {
      const response = await client.unary(
        (o) => client.rpc.createInstance(request, o),
        options,
        id ? client.retry : null,
        { instanceId: id, onRetry: () => (retried = true) },
      );
      return new InstanceHandle(client, response.instanceId);
    } catch (error) {
      if (!(error instanceof InstanceAlreadyExists) || id === undefined) {
        throw error;
      }
      if (ifExists === "error" && !retried) {
        throw error;
      }
      const existing = await this.existing(id, options);
      if (existing !== undefined && existing.workflow === this.name) {
        // With "error", only our own earlier attempt, whose answer was lost, counts.
        if (
          ifExists === "return" ||
          (sameJson(existing.params, convert.decodeJson(request.paramsJson)) &&
            existing.lookupKey === (lookupKey || undefined))
        ) {
          return new InstanceHandle(client, id);
        }
      }
      throw error;
    }
  }

  /** The CreateInstance message of `create` and `run`; throws for a bad id or params. */
  #createRequest(params: Params | undefined, options: RunOptions | CreateOptions) {
    const { id, lookupKey, priority, concurrencyKey } = options;
    if (id !== undefined) {
      checkText(id, "id");
    }
    return {
      workflow: this.name,
      instanceId: id ?? "",
      paramsJson: convert.encodeJson(params, "params"),
      lookupKey: lookupKey ?? "",
      priority: priority ?? 0,
      concurrencyKey: concurrencyKey ?? "",
    };
  }

  /**
   * Creates an instance and waits for its end, in one round trip
   * (RunInstance): what its `run` returned. Throws as `create` does for a
   * refused create, and as `InstanceHandle.result` does for the outcome:
   * {@link WorkflowFailed} if it ended errored, {@link WorkflowTerminated} if
   * it was terminated, {@link ResultTimeout} (naming the instance, which goes
   * on) if `timeoutMs` passes first:
   *
   * ```ts
   * const output = await client.workflow("onboarding-workflow").run(params, { id: "onboarding-42", timeoutMs: 60_000 });
   * ```
   *
   * With an `id` it is retried on `Unavailable` as `create` is, and so
   * outlives a server restart: a retry that finds the instance stored by an
   * earlier attempt (same workflow, params and lookup key) waits for it.
   * Without one it is not retried (a lost answer may hide a stored instance).
   */
  async run(params?: Params, options: RunOptions = {}): Promise<Output> {
    return outcome(await this.runInfo(params, options));
  }

  /**
   * As {@link run}, but resolves to the instance's final status (without its
   * steps) whatever its outcome, as `InstanceHandle.wait` does; throws
   * {@link ResultTimeout} if `timeoutMs` passes first.
   */
  async runInfo(params?: Params, options: RunOptions = {}): Promise<InstanceInfo<Params, Output>> {
    const client = this.#client;
    const { id, lookupKey, timeoutMs, signal } = options;
    const deadline = waitDeadline(timeoutMs);
    const instance = this.#createRequest(params, options);
    let retried = false;
    let info: InstanceInfo<Params, Output>;
    try {
      const response = await client.unary(
        // Each attempt waits what is left of timeoutMs, 30 s at most.
        (o) => client.rpc.runInstance({ instance, timeout: durationFromMs(pollMs(deadline)) }, o),
        { signal },
        id ? client.retry : null,
        {
          instanceId: id,
          onRetry: () => (retried = true),
          timeoutMs: client.timeoutMs === null ? null : LONG_POLL_MS + client.timeoutMs,
        },
      );
      info = convert.instance<Params, Output>(response.instance);
    } catch (error) {
      if (!(error instanceof InstanceAlreadyExists) || id === undefined || !retried) {
        throw error;
      }
      // Only our own earlier attempt, whose answer was lost, counts.
      const existing = await this.existing(id, { signal });
      if (
        existing === undefined ||
        existing.workflow !== this.name ||
        !sameJson(existing.params, convert.decodeJson(instance.paramsJson)) ||
        existing.lookupKey !== (lookupKey || undefined)
      ) {
        throw error;
      }
      info = existing as InstanceInfo<Params, Output>;
    }
    if (isFinished(info.status)) {
      return info;
    }
    if (deadline !== null && Date.now() >= deadline) {
      throw new ResultTimeout(info.id, timeoutMs as number, info.status);
    }
    return new InstanceHandle<Params, Output>(client, info.id).waitUntil(deadline, timeoutMs, signal);
  }

  /**
   * Creates several instances in one transaction: all of them, or none (one
   * refusal names every bad item, `requests[3]...`). The server takes 1 to 100.
   * Returns a handle per item, in order. Retried on `Unavailable` only when
   * every item has an `id`.
   */
  async createMany(
    items: readonly NewInstance<Params>[],
    options: CallOptions = {},
  ): Promise<InstanceHandle<Params, Output>[]> {
    const client = this.#client;
    const requests = items.map((item, i) => {
      if (item.id !== undefined) {
        checkText(item.id, `items[${i}].id`);
      }
      return {
        workflow: this.name,
        instanceId: item.id ?? "",
        paramsJson: convert.encodeJson(item.params, `items[${i}].params`),
        lookupKey: item.lookupKey ?? "",
        priority: item.priority ?? 0,
        concurrencyKey: item.concurrencyKey ?? "",
      };
    });
    const allIds = requests.length > 0 && requests.every((r) => r.instanceId !== "");
    let retried = false;
    try {
      const response = await client.unary(
        (o) => client.rpc.createInstances({ requests }, o),
        options,
        allIds ? client.retry : null,
        { onRetry: () => (retried = true) },
      );
      return response.instances.map((created) => new InstanceHandle(client, created.instanceId));
    } catch (error) {
      if (!(error instanceof InstanceAlreadyExists) || !retried) {
        throw error;
      }
      // All or none: if an earlier attempt stored the batch, every item is ours.
      for (const request of requests) {
        const existing = await this.existing(request.instanceId, options);
        if (
          existing === undefined ||
          existing.workflow !== this.name ||
          !sameJson(existing.params, convert.decodeJson(request.paramsJson)) ||
          existing.lookupKey !== (request.lookupKey || undefined)
        ) {
          throw error;
        }
      }
      return requests.map((r) => new InstanceHandle(client, r.instanceId));
    }
  }

  /**
   * The handle of an existing instance of this workflow. Throws
   * {@link InstanceNotFound} when there is none (also when `id` is an
   * instance of another workflow).
   */
  async get(id: string, options: CallOptions = {}): Promise<InstanceHandle<Params, Output>> {
    const handle = this.#client.instance<Params, Output>(id);
    const info = await handle.status(options);
    if (info.workflow !== this.name) {
      throw new InstanceNotFound(
        `instance_id: '${id}' is an instance of workflow '${info.workflow}', not of '${this.name}'`,
        { code: Code.NotFound, instanceId: id },
      );
    }
    return handle;
  }

  private async existing(id: string, options: CallOptions): Promise<InstanceInfo | undefined> {
    try {
      return await this.#client.instance(id).status(options);
    } catch (error) {
      if (error instanceof InstanceNotFound) {
        return undefined; // purged in the meantime
      }
      throw error;
    }
  }
}

/**
 * One workflow instance, by id: read it, control it, follow it. Made by
 * `WorkflowBinding.create`/`get` or `client.instance(id)`; it holds nothing
 * but the id: every method asks the server.
 */
export class InstanceHandle<Params = unknown, Output = unknown> {
  readonly #client: Client;
  /** The instance id. */
  readonly id: string;

  constructor(client: Client, id: string) {
    this.#client = client;
    this.id = id;
  }

  /** The instance's durable status, with its steps so far. */
  async status(options: CallOptions = {}): Promise<InstanceInfo<Params, Output>> {
    const client = this.#client;
    const response = await client.unary(
      (o) => client.rpc.getStatus({ instanceId: this.id }, o),
      options,
      client.retry,
      { instanceId: this.id },
    );
    return convert.instance(response.instance);
  }

  /**
   * Pauses at the next step boundary; resolves to `"paused"`, or
   * `"waitingForPause"` while a running step finishes. Throws
   * {@link FailedPrecondition} if the instance is finished or paused.
   */
  pause(options: CallOptions = {}): Promise<InstanceStatus> {
    return this.control(
      (o) => this.#client.rpc.pauseInstance({ instanceId: this.id }, o),
      (s) => s === "paused" || s === "waitingForPause",
      options,
    );
  }

  /**
   * Lets a paused (or pausing) instance go on; resolves to its new status.
   * Throws {@link FailedPrecondition} unless it is paused or pausing.
   */
  resume(options: CallOptions = {}): Promise<InstanceStatus> {
    return this.control(
      (o) => this.#client.rpc.resumeInstance({ instanceId: this.id }, o),
      (s) => s !== "paused" && s !== "waitingForPause",
      options,
    );
  }

  /**
   * Ends the instance now as `"terminated"` (an attempt in flight is
   * cancelled). Throws {@link FailedPrecondition} once it is finished. With
   * `rollback: true` the rollbacks of its succeeded steps run first: it
   * resolves to `"running"`, and the instance ends terminated once they ran.
   */
  terminate(options: CallOptions & { rollback?: boolean | undefined } = {}): Promise<InstanceStatus> {
    const { rollback = false, ...call } = options;
    return this.control(
      (o) => this.#client.rpc.terminateInstance({ instanceId: this.id, rollback }, o),
      (s) => s === "terminated",
      call,
    );
  }

  /**
   * Runs the instance again from scratch, same id and params; resolves to
   * `"running"` or `"queued"`. Never retried: a repeat would restart again.
   * With `fromStep` (and its `occurrence`), from that step: the results
   * recorded before it are kept, it and every step after it run again. A
   * restart from a step, or with a `reason`, is recorded in `repairs`.
   */
  async restart(options: CallOptions & RestartOptions = {}): Promise<InstanceStatus> {
    const { fromStep, occurrence = 1, reason = "", ...call } = options;
    const client = this.#client;
    const request = {
      instanceId: this.id,
      fromStep: fromStep ?? "",
      occurrence: fromStep ? occurrence : 0,
      reason,
    };
    const response = await client.unary(
      (o) => client.rpc.restartInstance(request, o),
      call,
      null,
      { instanceId: this.id },
    );
    return convert.status(response.status);
  }

  /**
   * Mends a stuck or failed instance: replaces the recorded result of `step`
   * with `output` (any JSON value, `null` too), or with `retry: true` runs the
   * failed step again with its full retries; then the instance goes on from
   * there (the steps recorded after it are replayed, not run again). `reason`
   * is required: the call is recorded in the instance's history with who made
   * it. Allowed for errored, terminated, paused and waiting instances. Resolves
   * to the audit entry recorded. Never retried.
   */
  async repair(step: string, options: CallOptions & RepairOptions): Promise<RepairInfo> {
    const { output, retry = false, reason, occurrence = 1, ...call } = options;
    const client = this.#client;
    const request = {
      instanceId: this.id,
      step,
      occurrence,
      outputJson: "output" in options ? convert.encodeJson(output, "output") : "",
      retry,
      reason,
    };
    const response = await client.unary(
      (o) => client.rpc.repairInstance(request, o),
      call,
      null,
      { instanceId: this.id },
    );
    return convert.repair(response.repair);
  }

  /**
   * Delivers an event to the instance's `step.wait_for_event(type=...)`. It
   * is stored before this resolves and taken by exactly one wait (one that
   * starts later too). Never retried: a repeat would deliver it twice. Throws
   * {@link FailedPrecondition} once the instance is finished.
   */
  async sendEvent(type: string, payload?: unknown, options: CallOptions = {}): Promise<void> {
    checkText(type, "type");
    const client = this.#client;
    const request = {
      instanceId: this.id,
      type,
      payloadJson: convert.encodeJson(payload, "payload"),
    };
    await client.unary((o) => client.rpc.sendEvent(request, o), options, null, {
      instanceId: this.id,
    });
  }

  /**
   * Every event of the instance after `afterSequence`, as it happens, ending
   * after the event that brings a final status:
   *
   * ```ts
   * for await (const event of instance.watch()) {
   *   if (event.kind === "stepSucceeded") console.log(event.step.name, event.output);
   * }
   * ```
   *
   * A stream cut by the network or a server stop or restart is opened again
   * after the last sequence received, so no event is missed or repeated; it
   * gives up (throwing {@link Unavailable}) after the client's `reconnect`
   * attempts in a row that brought no event. `break` closes the stream.
   */
  async *watch(options: WatchOptions = {}): AsyncGenerator<WatchEvent<Output>, void, undefined> {
    const after = options.afterSequence ?? 0;
    if (!Number.isSafeInteger(after) || after < 0) {
      throw new InvalidArgument(`afterSequence: must be an integer of 0 or more, got ${after}`);
    }
    const limit = options.timeoutMs === undefined ? null : checkTimeout(options.timeoutMs, "timeoutMs");
    const client = this.#client;
    const policy = client.reconnect;
    const deadline = limit === null ? null : Date.now() + limit;
    let last = after;
    let failures = 0;
    for (;;) {
      const remaining = deadline === null ? null : deadline - Date.now();
      if (remaining !== null && remaining <= 0) {
        throw new DeadlineExceeded(`watch of '${this.id}' ended by its timeout after sequence ${last}`, {
          code: Code.DeadlineExceeded,
          instanceId: this.id,
        });
      }
      // Our own controller, so that leaving the loop (a break, a throw)
      // closes the stream at once.
      const stop = new AbortController();
      const onAbort = (): void => stop.abort(options.signal?.reason);
      options.signal?.addEventListener("abort", onAbort, { once: true });
      if (options.signal?.aborted) {
        stop.abort(options.signal.reason);
      }
      try {
        const stream = client.rpc.watchInstance(
          { instanceId: this.id, afterSequence: BigInt(last) },
          client.callOptions({ signal: stop.signal }, remaining),
        );
        for await (const message of stream) {
          const event = convert.event<Output>(message);
          if (event.sequence <= last) {
            continue;
          }
          last = event.sequence;
          failures = 0;
          yield event;
        }
        return;
      } catch (reason) {
        const error = client.mapError(reason, options.signal, this.id);
        failures += 1;
        if (
          error.code === Code.DeadlineExceeded &&
          deadline !== null &&
          Date.now() >= deadline
        ) {
          throw new DeadlineExceeded(`watch of '${this.id}' ended by its timeout after sequence ${last}`, {
            code: Code.DeadlineExceeded,
            instanceId: this.id,
            cause: error,
          });
        }
        if (!retries(policy, error, failures, options.signal)) {
          throw error;
        }
      } finally {
        options.signal?.removeEventListener("abort", onAbort);
        stop.abort();
      }
      let pause = backoffMs(policy as RetryPolicy, failures);
      if (deadline !== null) {
        pause = Math.min(pause, Math.max(0, deadline - Date.now()));
      }
      await sleep(pause, options.signal).catch(() => {
        throw aborted(options.signal, this.id);
      });
    }
  }

  /**
   * The instance's status once it is final (complete, errored or
   * terminated), without its steps; whatever the outcome, nothing is thrown
   * for it. Throws {@link ResultTimeout} if `timeoutMs` passes first. Follows
   * the instance across server restarts (the client's `reconnect` policy).
   */
  async wait(options: WaitOptions = {}): Promise<InstanceInfo<Params, Output>> {
    return this.waitUntil(waitDeadline(options.timeoutMs), options.timeoutMs, options.signal);
  }

  /** @internal wait() until `deadline` (`null`: none), which is `timeoutMs` from its start. */
  async waitUntil(
    deadline: number | null,
    timeoutMs: number | undefined,
    signal: AbortSignal | undefined,
  ): Promise<InstanceInfo<Params, Output>> {
    const client = this.#client;
    const rpcTimeout = client.timeoutMs === null ? null : LONG_POLL_MS + client.timeoutMs;
    for (;;) {
      const response = await client.unary(
        (o) => client.rpc.waitInstance({ instanceId: this.id, timeout: durationFromMs(pollMs(deadline)) }, o),
        { signal },
        client.reconnect,
        { instanceId: this.id, timeoutMs: rpcTimeout },
      );
      const info = convert.instance<Params, Output>(response.instance);
      if (isFinished(info.status)) {
        return info;
      }
      if (deadline !== null && Date.now() >= deadline) {
        throw new ResultTimeout(this.id, timeoutMs as number, info.status);
      }
    }
  }

  /**
   * What the instance's `run` returned, once it is complete. Throws
   * {@link WorkflowFailed} (with the error's name and message) if it ended
   * errored, {@link WorkflowTerminated} if it was terminated, and
   * {@link ResultTimeout} if `timeoutMs` passes first.
   */
  async result(options: WaitOptions = {}): Promise<Output> {
    return outcome(await this.wait(options));
  }

  /**
   * A pause, resume or terminate, retried under the client's policy. A retry
   * refused with FailedPrecondition may be refused because the first attempt
   * did what was asked before its answer was lost: when the instance is where
   * the call would put it, that is success.
   */
  private async control(
    call: (options: ReturnType<Client["callOptions"]>) => Promise<{ status: number }>,
    reached: (status: InstanceStatus) => boolean,
    options: CallOptions,
  ): Promise<InstanceStatus> {
    const client = this.#client;
    let retried = false;
    try {
      const response = await client.unary(call, options, client.retry, {
        instanceId: this.id,
        onRetry: () => (retried = true),
      });
      return convert.status(response.status);
    } catch (error) {
      if (error instanceof FailedPrecondition && retried) {
        const current = (await this.status(options)).status;
        if (reached(current)) {
          return current;
        }
      }
      throw error;
    }
  }
}
