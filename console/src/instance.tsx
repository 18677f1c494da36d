/**
 * One instance: its status, params, output and error, the step timeline,
 * the steps, and the controls. Two calls make the view: GetStatus, and
 * WatchInstance from sequence 0, which replays the durable event log and
 * then stays open while the instance runs; each event it brings re-reads the
 * status (at most every 250 ms) for what events do not carry (wake times).
 */

import { useEffect, useRef, useState } from "preact/hooks";
import {
  isFinished,
  type InstanceInfo,
  type InstanceStatus,
  type PayloadSizes,
  type StepInfo,
  type WatchEvent,
} from "@cruzflow/client";
import { describe } from "./api";
import { ago, bytes, json, nearLimit, span, when } from "./format";
import type { Session } from "./main";
import { TimelineChart } from "./chart";
import { Alert, Dialog, Status } from "./ui";

type Control = "pause" | "resume" | "terminate" | "restart" | "event";

const CONTROLS: Record<Exclude<Control, "event">, { label: string; when: (s: InstanceStatus) => boolean; danger?: boolean; text: string }> = {
  pause: {
    label: "Pause",
    when: (s) => s === "queued" || s === "running" || s === "waiting",
    text: "The instance stops at its next step boundary: a running step finishes first.",
  },
  resume: {
    label: "Resume",
    when: (s) => s === "paused" || s === "waitingForPause",
    text: "The instance goes on from where it paused.",
  },
  terminate: {
    label: "Terminate",
    when: (s) => !isFinished(s),
    danger: true,
    text: "The instance ends now as terminated; an attempt in flight is cancelled. This cannot be undone.",
  },
  restart: {
    label: "Restart",
    when: () => true,
    danger: true,
    text: "The instance runs again from scratch with the same id and params; its step results are cleared.",
  },
};

export function InstancePage({ session, id }: { session: Session; id: string }) {
  const { client, caller } = session;
  const handle = client.instance(id);
  const [info, setInfo] = useState<InstanceInfo | undefined>();
  const [events, setEvents] = useState<WatchEvent[]>([]);
  const [error, setError] = useState<string | undefined>();
  const [watching, setWatching] = useState(false);
  const [now, setNow] = useState(Date.now());
  const [open, setOpen] = useState<Control | undefined>();
  const refresh = useRef<() => void>(() => undefined);

  // GetStatus, at most every 250 ms however many events arrive.
  useEffect(() => {
    let timer: number | undefined;
    let stale = false;
    const read = async (): Promise<void> => {
      try {
        const fresh = await handle.status();
        setNow(Date.now());
        setInfo(fresh);
        setError(undefined);
      } catch (e) {
        setError(describe(e));
      }
    };
    refresh.current = () => {
      if (timer !== undefined) {
        stale = true;
        return;
      }
      void read();
      timer = window.setTimeout(function again() {
        timer = undefined;
        if (stale) {
          stale = false;
          refresh.current();
        }
      }, 250);
    };
    void read();
    return () => window.clearTimeout(timer);
  }, [id]);

  // The event log, then live events until the instance is final; a cut
  // stream resumes after its last sequence (the client's reconnect policy).
  // A watch ends with the final event; a restart after it needs a new one.
  const [round, setRound] = useState(0);
  const [ended, setEnded] = useState<"no" | "final" | "failed">("no");
  useEffect(() => {
    const stop = new AbortController();
    const seen: WatchEvent[] = [];
    let flush: number | undefined;
    setEnded("no");
    setWatching(true);
    (async () => {
      let outcome: "final" | "failed" = "final";
      try {
        for await (const event of handle.watch({ signal: stop.signal })) {
          seen.push(event);
          if (flush === undefined) {
            flush = window.setTimeout(() => {
              flush = undefined;
              setEvents([...seen]);
              refresh.current();
            }, 50);
          }
        }
      } catch (e) {
        outcome = "failed";
        if (!stop.signal.aborted) {
          setError(describe(e));
        }
      } finally {
        if (!stop.signal.aborted) {
          window.clearTimeout(flush);
          setEvents([...seen]);
          setWatching(false);
          setEnded(outcome);
          refresh.current();
        }
      }
    })();
    return () => {
      stop.abort();
      window.clearTimeout(flush);
    };
  }, [id, round]);
  useEffect(() => {
    if (ended === "final" && info !== undefined && !isFinished(info.status)) {
      setRound((r) => r + 1);
    }
  }, [ended, info]);

  // The clock of running bars.
  const finished = info !== undefined && isFinished(info.status);
  useEffect(() => {
    if (finished) {
      return undefined;
    }
    const timer = window.setInterval(() => setNow(Date.now()), 1000);
    return () => window.clearInterval(timer);
  }, [finished]);

  if (info === undefined) {
    return (
      <section>
        <p>
          <a href="#/instances">← Instances</a>
        </p>
        <h1 class="mono">{id}</h1>
        {error ? <Alert message={error} /> : <p class="muted">Loading…</p>}
      </section>
    );
  }

  const failedStep = info.steps.find((s) => s.status === "failed");
  const traceLink = info.traceId && session.traceUrl ? session.traceUrl.replaceAll("{trace_id}", info.traceId) : "";

  return (
    <section>
      <p>
        <a href={`#/instances?workflow=${encodeURIComponent(info.workflow)}`}>← {info.workflow} instances</a>
      </p>
      <div class="page-head">
        <h1 class="mono" data-testid="instance-id">
          {info.id}
        </h1>
        <Status status={info.status} />
        {watching && !finished && <span class="tag live-tag">live</span>}
      </div>
      {!caller.readOnly && (
        <div class="controls" role="toolbar" aria-label="Controls">
          {(Object.keys(CONTROLS) as (keyof typeof CONTROLS)[])
            .filter((c) => CONTROLS[c].when(info.status))
            .map((c) => (
              <button
                type="button"
                key={c}
                class={CONTROLS[c].danger ? "danger" : ""}
                data-control={c}
                onClick={() => setOpen(c)}
              >
                {CONTROLS[c].label}…
              </button>
            ))}
          {!finished && (
            <button type="button" data-control="event" onClick={() => setOpen("event")}>
              Send event…
            </button>
          )}
        </div>
      )}
      <Alert message={error} onClose={() => setError(undefined)} />
      {open !== undefined && open !== "event" && (
        <ConfirmControl
          control={open}
          info={info}
          session={session}
          onDone={() => {
            setOpen(undefined);
            refresh.current();
          }}
        />
      )}
      {open === "event" && (
        <SendEvent
          info={info}
          session={session}
          waiting={info.steps.filter((s) => s.kind === "waitForEvent" && s.status === "running")}
          onDone={() => {
            setOpen(undefined);
            refresh.current();
          }}
        />
      )}
      <dl class="facts">
        <dt>Workflow</dt>
        <dd>{info.workflow}</dd>
        <dt>Created</dt>
        <dd title={ago(info.createTime)}>{when(info.createTime, true)}</dd>
        {info.startTime && info.createTime && info.startTime.getTime() !== info.createTime.getTime() && (
          <>
            <dt>Restarted</dt>
            <dd>{when(info.startTime, true)}</dd>
          </>
        )}
        <dt>Updated</dt>
        <dd>{when(info.updateTime, true)}</dd>
        {info.endTime && (
          <>
            <dt>Ended</dt>
            <dd>
              {when(info.endTime, true)}{" "}
              <span class="muted">
                after {span(info.endTime.getTime() - (info.startTime ?? info.createTime ?? info.endTime).getTime())}
              </span>
            </dd>
          </>
        )}
        {info.wakeTime && (
          <>
            <dt>Wakes</dt>
            <dd data-testid="wake-time">
              {when(info.wakeTime, true)} <span class="muted">({ago(info.wakeTime, now)})</span>
            </dd>
          </>
        )}
        {info.parentId && (
          <>
            <dt>Parent</dt>
            <dd class="mono" data-testid="parent">
              <a href={`#/instances/${encodeURIComponent(info.parentId)}`}>{info.parentId}</a>
            </dd>
          </>
        )}
        {info.lookupKey && (
          <>
            <dt>Lookup key</dt>
            <dd class="mono">{info.lookupKey}</dd>
          </>
        )}
        {info.traceId && (
          <>
            <dt>Trace</dt>
            <dd class="mono" data-testid="trace">
              {traceLink ? (
                <a href={traceLink} target="_blank" rel="noopener noreferrer">
                  {info.traceId}
                </a>
              ) : (
                info.traceId
              )}
            </dd>
          </>
        )}
      </dl>
      {info.error && (
        <div class="error-box" data-testid="instance-error">
          <h2>
            {info.error.name}: {info.error.message}
          </h2>
          {failedStep && (
            <p>
              Raised by step <b class="mono">{stepLabel(failedStep)}</b> after {failedStep.attempts} attempt
              {failedStep.attempts === 1 ? "" : "s"}.
            </p>
          )}
          {info.error.traceback && (
            <details>
              <summary>Traceback</summary>
              <pre>{info.error.traceback}</pre>
            </details>
          )}
        </div>
      )}
      <PayloadWarning info={info} />
      <h2>Timeline</h2>
      <TimelineChart events={events} info={info} now={now} />
      <div class="payloads">
        <div>
          <h2>
            Params <Size bytes={info.payloads?.paramsBytes} sizes={info.payloads} testId="params-size" />
          </h2>
          <pre data-testid="params">{json(info.params)}</pre>
        </div>
        {info.status === "complete" && (
          <div>
            <h2>
              Output <Size bytes={info.payloads?.outputBytes} sizes={info.payloads} testId="output-size" />
            </h2>
            <pre data-testid="output">{json(info.output)}</pre>
          </div>
        )}
      </div>
      <h2>Steps</h2>
      <StepsTable steps={info.steps} now={now} sizes={info.payloads} />
      <details class="events">
        <summary>
          Event log <span class="muted">({events.length} events)</span>
        </summary>
        <EventLog events={events} />
      </details>
    </section>
  );
}

/**
 * A stored payload's size against limits.max_payload_bytes ("53 B of 1 MiB"),
 * marked once it is near the limit; nothing from a server that does not
 * report sizes.
 */
function Size(props: { bytes: number | undefined; sizes: PayloadSizes | undefined; testId: string }) {
  const { bytes: n, sizes } = props;
  if (n === undefined || sizes === undefined) {
    return null;
  }
  const near = nearLimit(n, sizes.limitBytes);
  const share = Math.round((n / sizes.limitBytes) * 100);
  return (
    <span
      class={`size${near ? " near" : ""}`}
      data-testid={props.testId}
      data-near={near ? "true" : "false"}
      title={`${n.toLocaleString("en")} bytes of JSON stored; limits.max_payload_bytes is ${sizes.limitBytes.toLocaleString("en")}`}
    >
      {near && "⚠ "}
      {bytes(n)} of {bytes(sizes.limitBytes)}
      {near && ` (${share}%)`}
    </span>
  );
}

/** A warning above the page while params, a step result or the output is near the limit. */
function PayloadWarning({ info }: { info: InstanceInfo }) {
  const sizes = info.payloads;
  if (sizes === undefined) {
    return null;
  }
  const near: string[] = [];
  if (nearLimit(sizes.paramsBytes, sizes.limitBytes)) {
    near.push(`params (${bytes(sizes.paramsBytes)})`);
  }
  for (const s of info.steps) {
    if (nearLimit(s.outputBytes, sizes.limitBytes)) {
      near.push(`the result of step ${stepLabel(s)} (${bytes(s.outputBytes)})`);
    }
  }
  if (nearLimit(sizes.outputBytes, sizes.limitBytes)) {
    near.push(`the output (${bytes(sizes.outputBytes)})`);
  }
  if (near.length === 0) {
    return null;
  }
  return (
    <div class="payload-warning" role="status" data-testid="payload-warning">
      ⚠ Near the payload limit of {bytes(sizes.limitBytes)} (limits.max_payload_bytes): {near.join(", ")}. A payload
      past it is refused and a step returning one fails; store large data elsewhere and pass a reference.
    </div>
  );
}

export function stepLabel(step: { name: string; occurrence: number }): string {
  return step.occurrence > 1 ? `${step.name} #${step.occurrence}` : step.name;
}

function StepsTable({ steps, now, sizes }: { steps: readonly StepInfo[]; now: number; sizes: PayloadSizes | undefined }) {
  if (steps.length === 0) {
    return <p class="muted">No steps yet in this run.</p>;
  }
  return (
    <table class="steps">
      <thead>
        <tr>
          <th>#</th>
          <th>Step</th>
          <th>Kind</th>
          <th>Status</th>
          <th>Attempts</th>
          <th>Started</th>
          <th>Took</th>
          <th>Result</th>
          {sizes && <th>Size</th>}
        </tr>
      </thead>
      <tbody>
        {steps.map((s) => (
          <tr key={s.index} data-step={s.name} data-step-status={s.status}>
            <td>{s.index}</td>
            <td class="mono">{stepLabel(s)}</td>
            <td>
              {s.kind === "waitForEvent" ? (
                `wait for ${s.eventType ?? "event"}`
              ) : s.kind === "child" && s.childId ? (
                <a href={`#/instances/${encodeURIComponent(s.childId)}`} data-testid="child">
                  child {s.childId}
                </a>
              ) : (
                s.kind
              )}
            </td>
            <td>
              <span class={`step-status step-${s.status}`}>{s.status}</span>
            </td>
            <td>{s.attempts}</td>
            <td title={when(s.startTime, true)}>{when(s.startTime)}</td>
            <td>
              {s.startTime
                ? span(Math.max(0, (s.endTime?.getTime() ?? now) - s.startTime.getTime())) +
                  (s.endTime ? "" : " so far")
                : "—"}
            </td>
            <td class="result">
              {s.status === "succeeded" && <code>{short(JSON.stringify(s.output ?? null))}</code>}
              {s.error && (
                <span class="err" title={s.error.traceback ?? ""}>
                  {s.error.name}: {s.error.message}
                </span>
              )}
              {s.status === "running" && s.nextAttemptTime && (
                <span class="muted">
                  {s.kind === "do" ? "next attempt" : s.kind === "sleep" ? "wakes" : "times out"}{" "}
                  {ago(s.nextAttemptTime, now)}
                </span>
              )}
            </td>
            {sizes && (
              <td class="num">
                {s.status === "succeeded" && <Size bytes={s.outputBytes} sizes={sizes} testId="step-size" />}
              </td>
            )}
          </tr>
        ))}
      </tbody>
    </table>
  );
}

/** The durable event log, as WatchInstance streams it (and `cruzflow watch` prints it). */
function EventLog({ events }: { events: readonly WatchEvent[] }) {
  return (
    <table class="event-log">
      <thead>
        <tr>
          <th>#</th>
          <th>Time</th>
          <th>Event</th>
        </tr>
      </thead>
      <tbody>
        {events.map((e) => (
          <tr key={e.sequence} data-sequence={e.sequence} data-kind={e.kind}>
            <td>{e.sequence}</td>
            <td class="mono">{when(e.time, true)}</td>
            <td>{eventText(e)}</td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}

function eventText(e: WatchEvent): string {
  const error = (x: { error: { name: string; message: string } | undefined }): string =>
    x.error ? `: ${x.error.name}: ${x.error.message}` : "";
  switch (e.kind) {
    case "statusChanged":
      return `status ${e.status}${e.output !== null && e.status === "complete" ? `, output ${short(JSON.stringify(e.output))}` : ""}${error(e)}`;
    case "stepStarted":
      return `${stepLabel(e.step)} started (attempt ${e.attempt})`;
    case "attemptFailed":
      return `${stepLabel(e.step)} attempt ${e.attempt} failed${error(e)}; retry ${ago(e.nextAttemptTime)}`;
    case "stepSucceeded":
      return `${stepLabel(e.step)} succeeded (attempt ${e.attempt}), output ${short(JSON.stringify(e.output ?? null))}`;
    case "stepFailed":
      return `${stepLabel(e.step)} failed for good (attempt ${e.attempt})${error(e)}`;
    default:
      return "an event this console does not know";
  }
}

function short(text: string): string {
  return text.length > 80 ? `${text.slice(0, 77)}...` : text;
}

/**
 * A control's call: busy while it runs, `onDone` once it is accepted, and
 * the server's message (the dialog stays open) when it is refused.
 */
function useAction(onDone: () => void) {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | undefined>();
  const run = async (call: () => Promise<unknown>): Promise<void> => {
    setBusy(true);
    setError(undefined);
    try {
      await call();
      onDone();
    } catch (e) {
      setError(describe(e));
      setBusy(false);
    }
  };
  return { busy, error, setError, run };
}

function ConfirmControl(props: {
  control: Exclude<Control, "event">;
  info: InstanceInfo;
  session: Session;
  onDone: () => void;
}) {
  const { control, info, session } = props;
  const { busy, error, run } = useAction(props.onDone);
  const spec = CONTROLS[control];
  const act = (): Promise<void> => {
    const handle = session.client.instance(info.id);
    return run(() =>
      control === "pause"
        ? handle.pause()
        : control === "resume"
          ? handle.resume()
          : control === "terminate"
            ? handle.terminate()
            : handle.restart(),
    );
  };
  return (
    <Dialog
      title={`${spec.label} ${info.id}?`}
      confirm={spec.label}
      {...(spec.danger && { danger: true })}
      busy={busy}
      onConfirm={() => void act()}
      onCancel={props.onDone}
    >
      <p>{spec.text}</p>
      <Alert message={error} />
    </Dialog>
  );
}

function SendEvent(props: { info: InstanceInfo; session: Session; waiting: readonly StepInfo[]; onDone: () => void }) {
  const [type, setType] = useState(props.waiting[0]?.eventType ?? "");
  const [payload, setPayload] = useState("{}");
  const { busy, error, setError, run } = useAction(props.onDone);
  const send = async (): Promise<void> => {
    let value: unknown;
    try {
      value = payload.trim() === "" ? null : JSON.parse(payload);
    } catch (e) {
      setError(`The payload is not JSON: ${(e as Error).message}`);
      return;
    }
    await run(() => props.session.client.instance(props.info.id).sendEvent(type, value));
  };
  return (
    <Dialog
      title={`Send an event to ${props.info.id}`}
      confirm="Send"
      busy={busy}
      onConfirm={() => void send()}
      onCancel={props.onDone}
    >
      {props.waiting.length > 0 && (
        <p class="muted">
          Waiting for: {props.waiting.map((s) => s.eventType).filter(Boolean).join(", ")}
        </p>
      )}
      <label>
        Type
        <input name="type" value={type} onInput={(e) => setType(e.currentTarget.value)} required />
      </label>
      <label>
        Payload (JSON)
        <textarea name="payload" rows={6} value={payload} onInput={(e) => setPayload(e.currentTarget.value)} />
      </label>
      <Alert message={error} />
    </Dialog>
  );
}
