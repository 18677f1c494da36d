/**
 * The timeline of an instance, from its durable event log (WatchInstance from
 * sequence 0) and its status (GetStatus): one row per step of each run, one
 * bar per attempt (retries side by side on the step's row, with the backoff
 * between them), sleeps and event waits as spans up to their wake time,
 * pauses as shaded spans and restarts as lines across the chart.
 *
 * Pure: the same events give the same picture, so the browser tests can check
 * it from the page.
 */

import type { ErrorInfo, InstanceInfo, StepKind, WatchEvent } from "@cruzflow/client";
import { isFinished } from "@cruzflow/client";

export type Outcome = "succeeded" | "failed" | "retrying" | "running" | "cut" | "planned";

export interface Bar {
  readonly type: "attempt" | "backoff" | "sleep" | "wait";
  readonly start: number;
  end: number;
  /** Still going: its end is "now" (or, for a sleep, its wake time). */
  open: boolean;
  outcome: Outcome;
  readonly attempt: number;
  error: ErrorInfo | undefined;
  /** For a sleep or an event wait: when it ends by itself. */
  wake: number | undefined;
  detail: string;
}

export interface Row {
  readonly run: number;
  readonly index: number;
  readonly name: string;
  readonly occurrence: number;
  readonly kind: StepKind;
  readonly eventType: string | undefined;
  readonly bars: Bar[];
}

export interface Mark {
  readonly type: "pause" | "restart";
  readonly start: number;
  end: number;
  open: boolean;
}

export interface Timeline {
  readonly start: number;
  readonly end: number;
  readonly rows: readonly Row[];
  readonly marks: readonly Mark[];
  readonly runs: number;
}

const PAUSING = new Set(["paused", "waitingForPause"]);

export function build(events: readonly WatchEvent[], info: InstanceInfo | undefined, now: number): Timeline {
  const rows = new Map<string, Row>();
  const marks: Mark[] = [];
  let run = 1;
  let lastStatus: string | undefined;
  let restartAt: number | undefined;
  let pause: Mark | undefined;
  let first = info?.createTime?.getTime() ?? Number.POSITIVE_INFINITY;
  let last = Number.NEGATIVE_INFINITY;
  const runHasRows = (): boolean => [...rows.values()].some((r) => r.run === run);
  const openBar = (row: Row): Bar | undefined => row.bars.find((b) => b.open && b.type !== "backoff");
  const closeAll = (at: number, outcome: Outcome): void => {
    for (const row of rows.values()) {
      for (const bar of row.bars) {
        if (bar.open) {
          bar.open = false;
          bar.end = Math.max(bar.start, at);
          bar.outcome = bar.type === "backoff" ? bar.outcome : outcome;
        }
      }
    }
  };
  const newRun = (at: number): void => {
    closeAll(at, "cut");
    run += 1;
    marks.push({ type: "restart", start: at, end: at, open: false });
  };

  for (const event of events) {
    const t = event.time?.getTime() ?? last;
    first = Math.min(first, t);
    last = Math.max(last, t);
    switch (event.kind) {
      case "statusChanged": {
        const status = event.status;
        const previous = lastStatus;
        lastStatus = status;
        if (status === "running" || status === "queued") {
          if (previous !== undefined && isFinished(previous as never)) {
            newRun(t);
          } else if (previous === "running" || previous === "queued") {
            // Announced again while it ran: only a restart does that.
            if (runHasRows()) {
              newRun(t);
            }
          } else if (previous !== undefined) {
            // A wake, a resume, or a restart of a waiting or paused instance:
            // the next step tells (a restart begins again at step 0).
            restartAt = t;
          }
        }
        if (PAUSING.has(status)) {
          if (pause === undefined) {
            pause = { type: "pause", start: t, end: t, open: true };
            marks.push(pause);
          }
        } else if (pause !== undefined) {
          pause.end = t;
          pause.open = false;
          pause = undefined;
        }
        if (isFinished(status)) {
          closeAll(t, status === "terminated" ? "cut" : "failed");
        }
        break;
      }
      case "stepStarted": {
        const { step, attempt } = event;
        if (step.index === 0 && attempt === 1 && runHasRows()) {
          newRun(restartAt ?? t);
        }
        restartAt = undefined;
        const key = `${run}:${step.index}`;
        let row = rows.get(key);
        if (row === undefined) {
          row = {
            run,
            index: step.index,
            name: step.name,
            occurrence: step.occurrence,
            kind: step.kind,
            eventType: undefined,
            bars: [],
          };
          rows.set(key, row);
        }
        for (const bar of row.bars) {
          if (bar.open) {
            // The attempt before was cut short (a server restart), or its
            // backoff is over.
            bar.open = false;
            bar.end = Math.max(bar.start, t);
            if (bar.type !== "backoff") {
              bar.outcome = "cut";
            }
          }
        }
        const type = step.kind === "sleep" ? "sleep" : step.kind === "waitForEvent" ? "wait" : "attempt";
        row.bars.push({
          type,
          start: t,
          end: t,
          open: true,
          outcome: "running",
          attempt,
          error: undefined,
          wake: undefined,
          detail: "",
        });
        break;
      }
      case "attemptFailed": {
        const row = rows.get(`${run}:${event.step.index}`);
        const bar = row && openBar(row);
        if (row && bar) {
          bar.open = false;
          bar.end = Math.max(bar.start, t);
          bar.outcome = "retrying";
          bar.error = event.error;
          const next = event.nextAttemptTime?.getTime();
          if (next !== undefined) {
            row.bars.push({
              type: "backoff",
              start: t,
              end: Math.max(t, next),
              open: true,
              outcome: "planned",
              attempt: event.attempt,
              error: undefined,
              wake: next,
              detail: "",
            });
            last = Math.max(last, next);
          }
        }
        break;
      }
      case "stepSucceeded":
      case "stepFailed": {
        const row = rows.get(`${run}:${event.step.index}`);
        const bar = row && openBar(row);
        if (bar) {
          bar.open = false;
          bar.end = Math.max(bar.start, t);
          if (event.kind === "stepSucceeded") {
            bar.outcome = "succeeded";
            bar.detail = summary(event.output);
          } else {
            bar.outcome = "failed";
            bar.error = event.error;
          }
        }
        break;
      }
      default:
        break;
    }
  }

  // What GetStatus knows that the events do not: wake times, event types.
  const finished = info !== undefined && isFinished(info.status);
  for (const step of info?.steps ?? []) {
    const row = rows.get(`${run}:${step.index}`);
    if (row === undefined) {
      continue;
    }
    if (step.eventType !== undefined) {
      (row as { eventType: string | undefined }).eventType = step.eventType;
    }
    const bar = row.bars[row.bars.length - 1];
    const wake = step.nextAttemptTime?.getTime();
    if (bar !== undefined && wake !== undefined && (bar.type === "sleep" || bar.type === "wait")) {
      bar.wake = wake;
    }
  }
  for (const row of rows.values()) {
    for (const bar of row.bars) {
      if (bar.open) {
        if (finished) {
          bar.open = false;
        } else {
          bar.end = Math.max(bar.end, bar.type === "backoff" ? bar.end : now);
        }
      }
    }
  }
  for (const mark of marks) {
    if (mark.open) {
      mark.end = finished ? mark.end : now;
    }
  }
  if (!finished && events.length > 0) {
    last = Math.max(last, now);
  }
  if (!Number.isFinite(first)) {
    first = now;
  }
  if (!Number.isFinite(last) || last <= first) {
    last = first + 1000;
  }
  // A pending wake shows on the chart when it is near: the chart grows to
  // at most twice its span for it (an event wait's timeout of a day would
  // squash everything else into its first pixels).
  let wakes = last;
  for (const row of rows.values()) {
    for (const bar of row.bars) {
      if (bar.open && bar.wake !== undefined) {
        wakes = Math.max(wakes, bar.wake);
      }
    }
  }
  last = Math.min(wakes, last + (last - first));
  const ordered = [...rows.values()].sort((a, b) => a.run - b.run || a.index - b.index);
  return { start: first, end: last, rows: ordered, marks, runs: run };
}

function summary(value: unknown): string {
  const text = JSON.stringify(value ?? null);
  return text.length > 120 ? `${text.slice(0, 117)}...` : text;
}
