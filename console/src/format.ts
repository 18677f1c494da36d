/** How the console writes times, durations, statuses and JSON. */

import type { InstanceStatus } from "@cruzflow/client";

export const STATUS_WORDS: Record<InstanceStatus, string> = {
  queued: "queued",
  running: "running",
  paused: "paused",
  waiting: "waiting",
  waitingForPause: "pausing",
  complete: "complete",
  errored: "errored",
  terminated: "terminated",
  unknown: "unknown",
};

/** A time as the user's clock shows it, to the second (milliseconds when asked). */
export function when(date: Date | undefined, ms = false): string {
  if (date === undefined) {
    return "—";
  }
  const pad = (n: number, width = 2): string => String(n).padStart(width, "0");
  const day = `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}`;
  const time = `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
  return `${day} ${time}${ms ? `.${pad(date.getMilliseconds(), 3)}` : ""}`;
}

/** How long ago, in the largest unit that reads well ("3 s ago", "2 h ago"). */
export function ago(date: Date | undefined, now = Date.now()): string {
  if (date === undefined) {
    return "—";
  }
  const s = (now - date.getTime()) / 1000;
  if (s < 0) {
    return `in ${span(-s * 1000)}`;
  }
  return `${span(s * 1000)} ago`;
}

/** A duration in ms, e.g. "850 ms", "12.4 s", "3 min 5 s", "2 h 10 min". */
export function span(ms: number): string {
  if (ms < 1000) {
    return `${Math.round(ms)} ms`;
  }
  const s = ms / 1000;
  if (s < 59.5) {
    return `${s < 9.95 ? s.toFixed(1) : Math.round(s)} s`;
  }
  // Whole seconds first, so that 59.6 s reads "1 min 0 s", never "0 min 60 s".
  const total = Math.round(s);
  const m = Math.floor(total / 60);
  if (m < 60) {
    return `${m} min ${total % 60} s`;
  }
  const h = Math.floor(m / 60);
  if (h < 48) {
    return `${h} h ${m % 60} min`;
  }
  return `${Math.floor(h / 24)} d ${h % 24} h`;
}

/** A JSON value, indented; `undefined` and `null` read as "null". */
export function json(value: unknown): string {
  return JSON.stringify(value ?? null, null, 2);
}

/** "datetime-local" input text for a date, and back. */
export function toLocalInput(date: Date | undefined): string {
  if (date === undefined) {
    return "";
  }
  const local = new Date(date.getTime() - date.getTimezoneOffset() * 60_000);
  return local.toISOString().slice(0, 16);
}

export function fromLocalInput(text: string): Date | undefined {
  if (!text) {
    return undefined;
  }
  const date = new Date(text);
  return Number.isNaN(date.getTime()) ? undefined : date;
}

/** A byte count in binary units, as the CLI writes it: "512 B", "1.2 KiB", "1 MiB". */
export function bytes(n: number): string {
  if (n < 1024) {
    return `${n} B`;
  }
  let value = n / 1024;
  let unit = "KiB";
  for (const bigger of ["MiB", "GiB"]) {
    if (value < 1023.95) {
      break;
    }
    value /= 1024;
    unit = bigger;
  }
  return `${value.toFixed(1).replace(/\.0$/, "")} ${unit}`;
}

/**
 * The share of limits.max_payload_bytes from which a payload is flagged: it
 * still fits, but one that keeps growing will soon be refused.
 */
export const NEAR_LIMIT = 0.8;

/** Whether a payload of `n` bytes is within sight of `limit`. */
export function nearLimit(n: number, limit: number): boolean {
  return limit > 0 && n >= NEAR_LIMIT * limit;
}
