/**
 * The client's domain types: what the service's messages mean, in
 * TypeScript terms, as in the Python client (`cruzflow.client._types`).
 *
 * Payloads arrive parsed from JSON, times as `Date`s, durations as
 * milliseconds, and the protobuf enums as the status words the service
 * documents (`"running"`, `"waitingForPause"`, `"complete"`).
 *
 * @module
 */

/** The lifecycle state of an instance, as the service spells it. */
export type InstanceStatus =
  /** Stored, waiting for a free slot to run. */
  | "queued"
  | "running"
  | "paused"
  /** In a durable sleep or waiting for an event. */
  | "waiting"
  /** A pause was asked for; the running step finishes first. */
  | "waitingForPause"
  | "complete"
  | "errored"
  | "terminated"
  /** Also what a status this client does not know yet is read as. */
  | "unknown";

/** Every {@link InstanceStatus} but `"unknown"`: what `listInstances` can filter by. */
export const INSTANCE_STATUSES: readonly Exclude<InstanceStatus, "unknown">[] = [
  "queued",
  "running",
  "paused",
  "waiting",
  "waitingForPause",
  "complete",
  "errored",
  "terminated",
];

/** True for the final statuses: complete, errored and terminated. */
export function isFinished(status: InstanceStatus): boolean {
  return status === "complete" || status === "errored" || status === "terminated";
}

/**
 * The state of one step: `"running"` while an attempt is in flight or the
 * next is scheduled; `"failed"` after all its attempts, its error raised into
 * `run`.
 */
export type StepStatus = "running" | "succeeded" | "failed" | "unknown";

/**
 * What a step does: `"do"` runs a callback (`step.do`), `"sleep"` is
 * `step.sleep`/`step.sleep_until`, `"waitForEvent"` is `step.wait_for_event`,
 * `"child"` is `step.child` (it starts a child instance and waits for it),
 * `"rollback"` a step's rollback (run when the instance failed or was
 * terminated with rollback), `"version"` a version marker (`step.version`:
 * where new code took a new path).
 */
export type StepKind =
  | "do"
  | "sleep"
  | "waitForEvent"
  | "child"
  | "rollback"
  | "version"
  | "unknown";

/**
 * An error the way Python names it: the exception class and its text, and
 * where it was raised.
 */
export interface ErrorInfo {
  /** The exception class name, e.g. `"ValueError"`. */
  readonly name: string;
  readonly message: string;
  /**
   * The traceback as Python prints it (at most 8 KiB), or `undefined` when no
   * code raised the error (a timed-out event wait, an interrupted attempt).
   */
  readonly traceback: string | undefined;
}

/** One step of an instance, as `InstanceHandle.status()` reports it. */
export interface StepInfo {
  /** The name given to `step.do` (or `sleep`, `wait_for_event`). */
  readonly name: string;
  /** 1 for the first step of this name in a run, 2 for the second, ... */
  readonly occurrence: number;
  /** Position among all steps of the run, from 0. */
  readonly index: number;
  readonly kind: StepKind;
  readonly status: StepStatus;
  /** Attempts started so far, including one cut short by a server restart. */
  readonly attempts: number;
  readonly startTime: Date | undefined;
  readonly endTime: Date | undefined;
  /** The step's result, parsed from JSON; `null` until it succeeded. */
  readonly output: unknown;
  /** The last attempt's error; final once the step failed. */
  readonly error: ErrorInfo | undefined;
  /**
   * When a pending retry is due; for a sleep when it ends; for an event wait
   * when it times out.
   */
  readonly nextAttemptTime: Date | undefined;
  /** For an event wait: the event type it waits for. */
  readonly eventType: string | undefined;
  /** For a child step: the child instance's id. */
  readonly childId: string | undefined;
  /**
   * The stored size of the step's result, in bytes of JSON; 0 until it
   * succeeded. It must stay within {@link PayloadSizes.limitBytes}.
   */
  readonly outputBytes: number;
}

/**
 * How many bytes of JSON an instance stores, against the server's limit
 * (`limits.max_payload_bytes`), which params, each event payload, each step
 * result and the output must each stay within.
 */
export interface PayloadSizes {
  readonly paramsBytes: number;
  /** 0 until the instance is complete. */
  readonly outputBytes: number;
  /** The largest step result; 0 in listings, which carry no steps. */
  readonly largestStepBytes: number;
  /** Params, output and every step result added up (steps: as above). */
  readonly totalBytes: number;
  readonly limitBytes: number;
}

/**
 * The durable state of one instance. `Params` and `Output` are the types the
 * caller declared for the workflow's params and for what its `run` returns;
 * the client does not check them (they are JSON from the server).
 */
export interface InstanceInfo<Params = unknown, Output = unknown> {
  readonly id: string;
  readonly workflow: string;
  readonly status: InstanceStatus;
  /** The params the instance was created with, parsed from JSON. */
  readonly params: Params;
  /** What `run` returned, parsed from JSON; `null` unless complete. */
  readonly output: Output | null;
  /** Set once errored. */
  readonly error: ErrorInfo | undefined;
  readonly createTime: Date | undefined;
  readonly updateTime: Date | undefined;
  /** Set once the instance reached a final status. */
  readonly endTime: Date | undefined;
  /** While waiting: when it resumes by itself (a sleep ends, an event wait times out). */
  readonly wakeTime: Date | undefined;
  /** When the current run began: the creation, or the last restart. */
  readonly startTime: Date | undefined;
  /** The lookup key given at creation. */
  readonly lookupKey: string | undefined;
  /** Sequence number of the newest event (see `InstanceHandle.watch`). */
  readonly lastSequence: number;
  /** The steps so far, in the order `run` reached them; empty in listings. */
  readonly steps: readonly StepInfo[];
  /**
   * The W3C trace id (32 hex digits) of the trace the instance's runs belong
   * to, when the server traces; `undefined` otherwise.
   */
  readonly traceId: string | undefined;
  /**
   * The instance whose `step.child` started this one; `undefined` for one
   * created through the API (list a parent's children with
   * `listInstances({ parentId })`).
   */
  readonly parentId: string | undefined;
  /** The priority given at creation (orders the instances waiting for a concurrency slot). */
  readonly priority: number;
  /** The concurrency key whose slot the instance takes (a workflow limited per key). */
  readonly concurrencyKey: string | undefined;
  /** The schedule that created the instance; `undefined` when a caller did. */
  readonly scheduleId: string | undefined;
  /** Its audited repairs and restarts from a step, oldest first; empty in listings. */
  readonly repairs: readonly RepairInfo[];
  /**
   * The stored size of the params, step results and output against the
   * limit; `undefined` from a server too old to report it.
   */
  readonly payloads: PayloadSizes | undefined;
}

/**
 * One audited change of an instance's recorded steps: a repair
 * (`InstanceHandle.repair`) or a restart from a step (or with a reason).
 */
export interface RepairInfo {
  readonly time: Date | undefined;
  /** The calling token's name; `"anonymous"` when the server has no authentication. */
  readonly actor: string;
  /** The caller's address as the server saw it. */
  readonly peer: string | undefined;
  readonly reason: string;
  readonly action: "setOutput" | "retry" | "restart" | "unknown";
  /** The step repaired, or restarted from; `undefined` for a restart from scratch. */
  readonly step: StepRef | undefined;
  /** With `"setOutput"`: the result set, parsed from JSON. */
  readonly output: unknown;
}

/** Which step a {@link WatchEvent} is about. */
export interface StepRef {
  readonly name: string;
  readonly occurrence: number;
  readonly index: number;
  readonly kind: StepKind;
}

/** What every {@link WatchEvent} has. */
interface EventBase {
  readonly instanceId: string;
  /** Starts at 1 and grows by one for every event of the instance. */
  readonly sequence: number;
  readonly time: Date | undefined;
}

/**
 * The instance entered a new status: `output` once complete, `error` once
 * errored. The event that brings a final status (`isFinal`) ends the watch.
 */
export interface StatusChangedEvent<Output = unknown> extends EventBase {
  readonly kind: "statusChanged";
  readonly status: InstanceStatus;
  readonly output: Output | null;
  readonly error: ErrorInfo | undefined;
  /** True for the change to a final status (complete, errored, terminated). */
  readonly isFinal: boolean;
}

/** An attempt of a step began. */
export interface StepStartedEvent extends EventBase {
  readonly kind: "stepStarted";
  readonly step: StepRef;
  readonly attempt: number;
}

/** An attempt failed and the step will be retried. */
export interface AttemptFailedEvent extends EventBase {
  readonly kind: "attemptFailed";
  readonly step: StepRef;
  readonly attempt: number;
  readonly error: ErrorInfo | undefined;
  readonly nextAttemptTime: Date | undefined;
  /** The delay before the next attempt, in milliseconds. */
  readonly retryDelayMs: number | undefined;
}

/** A step's result is durably stored. */
export interface StepSucceededEvent extends EventBase {
  readonly kind: "stepSucceeded";
  readonly step: StepRef;
  readonly attempt: number;
  readonly output: unknown;
}

/** A step failed for good and its error was raised into `run`. */
export interface StepFailedEvent extends EventBase {
  readonly kind: "stepFailed";
  readonly step: StepRef;
  readonly attempt: number;
  readonly error: ErrorInfo | undefined;
}

/** A repair or a restart from a step was recorded (see {@link RepairInfo}). */
export interface RepairedEvent extends EventBase {
  readonly kind: "repaired";
  readonly repair: RepairInfo;
}

/** An event of a kind this client does not know yet. */
export interface UnknownEvent extends EventBase {
  readonly kind: "unknown";
}

/**
 * One event of an instance's durable event log; switch on `kind` to see its
 * fields.
 */
export type WatchEvent<Output = unknown> =
  | StatusChangedEvent<Output>
  | StepStartedEvent
  | AttemptFailedEvent
  | StepSucceededEvent
  | StepFailedEvent
  | RepairedEvent
  | UnknownEvent;

/** A workflow class the server hosts. */
export interface WorkflowInfo {
  /** What instances are created by, e.g. `"onboarding-workflow"`. */
  readonly name: string;
  /** The binding name from the server's config, e.g. `"ONBOARDING_WORKFLOW"`. */
  readonly binding: string;
  /** The Python class, as `"package.module:Class"`. */
  readonly className: string;
}

/** One page of `client.listInstancesPage()`. */
export interface InstancePage {
  /** Newest first, without their steps. */
  readonly instances: readonly InstanceInfo[];
  /** Pass it back (with the same filters) for the next page; empty on the last. */
  readonly nextPageToken: string;
}

/** How many instances of a workflow are in a status (`client.countInstances()`). */
export interface InstanceCount {
  readonly workflow: string;
  readonly status: InstanceStatus;
  readonly count: number;
}

/** The answer of `client.countInstances()`. */
export interface InstanceCounts {
  /** One per workflow and status that has instances, by workflow, then status. */
  readonly counts: readonly InstanceCount[];
  /** The sum of the counts. */
  readonly total: number;
}

/** What the client's token may do (`client.caller()`). */
export interface CallerInfo {
  /** Whether the server asks for a token at all; without, every call is allowed. */
  readonly authRequired: boolean;
  /** The token's name in the server's config; `""` without auth. */
  readonly tokenName: string;
  /** A read-only token may call only the methods that change nothing. */
  readonly readOnly: boolean;
  /** The workflows whose instances it may see and change; empty: all. */
  readonly workflows: readonly string[];
}

/** What a schedule does about due times no server fired in time. */
export type CatchUpPolicy = "skip" | "once";

/**
 * A cron schedule (`client.createSchedule()`): an instance of `workflow` at
 * each due time, with the id `sched-<id>-<due time, UTC>`.
 */
export interface ScheduleInfo {
  readonly id: string;
  readonly workflow: string;
  /** Five fields, or six with seconds first, e.g. `"0 9 * * MON"`. */
  readonly cron: string;
  /** The IANA time zone the cron expression is read in. */
  readonly timezone: string;
  /** The params of every instance it creates, parsed from JSON. */
  readonly params: unknown;
  /** `"once"`: the most recent missed due time fires once; `"skip"`: none. */
  readonly catchUp: CatchUpPolicy;
  readonly paused: boolean;
  /** `"config"` (the server's `[[schedules]]`) or `"api"`. */
  readonly origin: "config" | "api";
  /** The due time of the last instance it created at a due time. */
  readonly lastDueTime: Date | undefined;
  readonly lastInstanceId: string | undefined;
  /** `undefined` while paused. */
  readonly nextDueTime: Date | undefined;
  readonly createTime: Date | undefined;
  readonly updateTime: Date | undefined;
}
