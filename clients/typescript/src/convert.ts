/**
 * Protobuf messages to the client's domain types, and JSON in and out.
 *
 * @module
 */

import { timestampDate, type Duration, type Timestamp } from "@bufbuild/protobuf/wkt";
import { InvalidArgument } from "./errors.js";
import * as pb from "./gen/cruzflow/v1/workflows_pb.js";
import { INSTANCE_STATUSES } from "./types.js";
import type {
  CallerInfo,
  ErrorInfo,
  InstanceCounts,
  InstanceInfo,
  InstanceStatus,
  PayloadSizes,
  RepairInfo,
  ScheduleInfo,
  StepInfo,
  StepKind,
  StepRef,
  StepStatus,
  WatchEvent,
  WorkflowInfo,
} from "./types.js";

// The words go through the generated enums' own names (WAITING_FOR_PAUSE ->
// "waitingForPause"), so the numbering is kept in one place: the proto.
function camel(name: string): string {
  return name.toLowerCase().replace(/_([a-z])/g, (_, c: string) => c.toUpperCase());
}

function wordsOf<E extends Record<string, string | number>>(
  numbers: E,
  known: readonly string[],
): Map<number, string> {
  const words = new Map<number, string>();
  for (const [name, number] of Object.entries(numbers)) {
    if (typeof number === "number" && known.includes(camel(name))) {
      words.set(number, camel(name));
    }
  }
  return words;
}

const STATUS_WORDS = wordsOf(pb.InstanceStatus, INSTANCE_STATUSES) as Map<number, InstanceStatus>;
const STATUS_NUMBERS = new Map([...STATUS_WORDS].map(([number, word]) => [word, number]));
const STEP_STATUS_WORDS = wordsOf(pb.StepStatus, ["running", "succeeded", "failed"]) as Map<
  number,
  StepStatus
>;
const STEP_KIND_WORDS = wordsOf(pb.StepKind, ["do", "sleep", "waitForEvent", "child", "rollback", "version"]) as Map<
  number,
  StepKind
>;

/** A status number; one this client does not know reads as `"unknown"`. */
export function status(number: pb.InstanceStatus): InstanceStatus {
  return STATUS_WORDS.get(number) ?? "unknown";
}

/** The proto number of a status word (`"running"`), for ListInstances' filter. */
export function statusToPb(word: string): pb.InstanceStatus {
  const number = STATUS_NUMBERS.get(word as InstanceStatus);
  if (number === undefined) {
    const known = [...STATUS_NUMBERS.keys()].join(", ");
    throw new InvalidArgument(
      `status: ${JSON.stringify(word)} is not a status; use one of ${known}`,
    );
  }
  return number;
}

/** JSON text for a `*_json` field; `undefined` is sent as empty (null). */
export function encodeJson(value: unknown, what: string): string {
  if (value === undefined) {
    return "";
  }
  let text: string | undefined;
  try {
    text = JSON.stringify(value);
  } catch (error) {
    throw new InvalidArgument(`${what}: not JSON-serialisable: ${String(error)}`, {
      cause: error,
    });
  }
  if (text === undefined) {
    throw new InvalidArgument(`${what}: not JSON-serialisable (${typeof value})`);
  }
  return text;
}

/** The value of a `*_json` field; empty is `null`. */
export function decodeJson(text: string): unknown {
  return text === "" ? null : (JSON.parse(text) as unknown);
}

function date(value: Timestamp | undefined): Date | undefined {
  return value === undefined ? undefined : timestampDate(value);
}

function millis(value: Duration | undefined): number | undefined {
  return value === undefined ? undefined : Number(value.seconds) * 1000 + value.nanos / 1e6;
}

function error(value: pb.Error | undefined): ErrorInfo | undefined {
  if (value === undefined) {
    return undefined;
  }
  return { name: value.name, message: value.message, traceback: value.traceback || undefined };
}

function step(value: pb.Step): StepInfo {
  return {
    name: value.name,
    occurrence: value.occurrence,
    index: value.index,
    kind: STEP_KIND_WORDS.get(value.kind) ?? "unknown",
    status: STEP_STATUS_WORDS.get(value.status) ?? "unknown",
    attempts: value.attempts,
    startTime: date(value.startTime),
    endTime: date(value.endTime),
    output: decodeJson(value.outputJson),
    error: error(value.error),
    nextAttemptTime: date(value.nextAttemptTime),
    eventType: value.eventType || undefined,
    childId: value.childInstanceId || undefined,
    outputBytes: Number(value.outputSizeBytes),
  };
}

function payloads(value: pb.PayloadSizes | undefined): PayloadSizes | undefined {
  if (value === undefined) {
    return undefined;
  }
  return {
    paramsBytes: Number(value.paramsBytes),
    outputBytes: Number(value.outputBytes),
    largestStepBytes: Number(value.largestStepBytes),
    totalBytes: Number(value.totalBytes),
    limitBytes: Number(value.limitBytes),
  };
}

function stepRef(value: pb.StepRef | undefined): StepRef {
  return {
    name: value?.name ?? "",
    occurrence: value?.occurrence ?? 0,
    index: value?.index ?? 0,
    kind: STEP_KIND_WORDS.get(value?.kind ?? 0) ?? "unknown",
  };
}

/** An Instance message as {@link InstanceInfo}. */
export function instance<P, O>(value: pb.Instance | undefined): InstanceInfo<P, O> {
  if (value === undefined) {
    throw new TypeError("the server's answer has no instance");
  }
  return {
    id: value.instanceId,
    workflow: value.workflow,
    status: status(value.status),
    params: decodeJson(value.paramsJson) as P,
    output: decodeJson(value.outputJson) as O | null,
    error: error(value.error),
    createTime: date(value.createTime),
    updateTime: date(value.updateTime),
    endTime: date(value.endTime),
    wakeTime: date(value.wakeTime),
    startTime: date(value.startTime),
    lookupKey: value.lookupKey || undefined,
    lastSequence: Number(value.lastSequence),
    steps: value.steps.map(step),
    traceId: value.traceId || undefined,
    parentId: value.parentId || undefined,
    priority: value.priority,
    concurrencyKey: value.concurrencyKey || undefined,
    scheduleId: value.scheduleId || undefined,
    repairs: value.repairs.map(repair),
    payloads: payloads(value.payloads),
  };
}

const REPAIR_ACTIONS = new Map<number, RepairInfo["action"]>([
  [pb.RepairAction.SET_OUTPUT, "setOutput"],
  [pb.RepairAction.RETRY, "retry"],
  [pb.RepairAction.RESTART, "restart"],
]);

/** A Repair message (an audit entry) as {@link RepairInfo}. */
export function repair(value: pb.Repair | undefined): RepairInfo {
  return {
    time: date(value?.time),
    actor: value?.actor ?? "",
    peer: value?.peer || undefined,
    reason: value?.reason ?? "",
    action: REPAIR_ACTIONS.get(value?.action ?? 0) ?? "unknown",
    step: value?.step === undefined ? undefined : stepRef(value.step),
    output: decodeJson(value?.outputJson ?? ""),
  };
}

/** A WatchInstanceResponse as a {@link WatchEvent}. */
export function event<O>(value: pb.WatchInstanceResponse): WatchEvent<O> {
  const base = {
    instanceId: value.instanceId,
    sequence: Number(value.sequence),
    time: date(value.time),
  };
  const e = value.event;
  switch (e.case) {
    case "statusChanged": {
      const word = status(e.value.status);
      return {
        ...base,
        kind: "statusChanged",
        status: word,
        output: decodeJson(e.value.outputJson) as O | null,
        error: error(e.value.error),
        isFinal: word === "complete" || word === "errored" || word === "terminated",
      };
    }
    case "stepStarted":
      return { ...base, kind: "stepStarted", step: stepRef(e.value.step), attempt: e.value.attempt };
    case "attemptFailed":
      return {
        ...base,
        kind: "attemptFailed",
        step: stepRef(e.value.step),
        attempt: e.value.attempt,
        error: error(e.value.error),
        nextAttemptTime: date(e.value.nextAttemptTime),
        retryDelayMs: millis(e.value.retryDelay),
      };
    case "stepSucceeded":
      return {
        ...base,
        kind: "stepSucceeded",
        step: stepRef(e.value.step),
        attempt: e.value.attempt,
        output: decodeJson(e.value.outputJson),
      };
    case "stepFailed":
      return {
        ...base,
        kind: "stepFailed",
        step: stepRef(e.value.step),
        attempt: e.value.attempt,
        error: error(e.value.error),
      };
    case "repaired":
      return { ...base, kind: "repaired", repair: repair(e.value) };
    default:
      return { ...base, kind: "unknown" };
  }
}

/** A Workflow message as {@link WorkflowInfo}. */
export function workflow(value: pb.Workflow): WorkflowInfo {
  return { name: value.name, binding: value.binding, className: value.className };
}

/** A CountInstancesResponse as {@link InstanceCounts}. */
export function counts(value: pb.CountInstancesResponse): InstanceCounts {
  return {
    counts: value.counts.map((c) => ({ workflow: c.workflow, status: status(c.status), count: Number(c.count) })),
    total: Number(value.total),
  };
}

/** A GetCallerResponse as {@link CallerInfo}. */
export function caller(value: pb.GetCallerResponse): CallerInfo {
  return {
    authRequired: value.authRequired,
    tokenName: value.tokenName,
    readOnly: value.readOnly,
    workflows: [...value.workflows],
  };
}

/** A Schedule as a {@link ScheduleInfo}. */
export function schedule(value: pb.Schedule | undefined): ScheduleInfo {
  if (value === undefined) {
    throw new TypeError("the server's answer has no schedule");
  }
  return {
    id: value.scheduleId,
    workflow: value.workflow,
    cron: value.cron,
    timezone: value.timezone,
    params: decodeJson(value.paramsJson),
    catchUp: value.catchUp === pb.CatchUpPolicy.SKIP ? "skip" : "once",
    paused: value.paused,
    origin: value.origin === pb.ScheduleOrigin.CONFIG ? "config" : "api",
    lastDueTime: date(value.lastDueTime),
    lastInstanceId: value.lastInstanceId || undefined,
    nextDueTime: date(value.nextDueTime),
    createTime: date(value.createTime),
    updateTime: date(value.updateTime),
  };
}
