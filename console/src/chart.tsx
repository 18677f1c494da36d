/**
 * The timeline drawn to scale as SVG: time runs left to right over the
 * instance's life, one row per step; the hover text of each bar (an SVG
 * <title>) says what it was, how long it took, and its error.
 */

import { useEffect, useMemo, useRef, useState } from "preact/hooks";
import type { InstanceInfo, WatchEvent } from "@cruzflow/client";
import { span, when } from "./format";
import { build, type Bar, type Row } from "./timeline";

const LABEL = 190;
const PAD = 14;
const ROW = 26;
const BAR = 14;
const AXIS = 26;
/** Rows drawn at most: an instance of thousands of steps shows its newest. */
export const MAX_ROWS = 300;

export function TimelineChart({ events, info, now }: { events: readonly WatchEvent[]; info: InstanceInfo; now: number }) {
  const box = useRef<HTMLDivElement>(null);
  const [width, setWidth] = useState(900);
  useEffect(() => {
    const element = box.current;
    if (!element) {
      return undefined;
    }
    const observer = new ResizeObserver(() => setWidth(Math.max(480, element.clientWidth)));
    observer.observe(element);
    return () => observer.disconnect();
  }, []);
  const model = useMemo(() => build(events, info, now), [events, info, now]);

  if (model.rows.length === 0) {
    return (
      <div ref={box} class="timeline empty">
        <p class="muted">No step has started yet.</p>
      </div>
    );
  }
  const hidden = Math.max(0, model.rows.length - MAX_ROWS);
  const shown = hidden > 0 ? model.rows.slice(hidden) : model.rows;
  const plot = width - LABEL - PAD;
  const duration = model.end - model.start;
  const x = (t: number): number => LABEL + ((t - model.start) / duration) * plot;
  const height = AXIS + shown.length * ROW + 8;
  const ticks = axis(model.start, model.end);

  return (
    <div ref={box} class="timeline">
      {hidden > 0 && (
        <p class="muted timeline-note" data-testid="rows-hidden">
          The first {hidden} of {model.rows.length} steps are left out; the table below lists them all.
        </p>
      )}
      <svg
        class="chart"
        width={width}
        height={height}
        viewBox={`0 0 ${width} ${height}`}
        role="img"
        aria-label={`Timeline of ${info.id}: ${model.rows.length} steps over ${span(duration)}`}
        data-start={model.start}
        data-end={model.end}
      >
        {ticks.map((t) => (
          <g key={t} class="tick">
            <line x1={x(t)} x2={x(t)} y1={AXIS - 6} y2={height} />
            <text x={x(t)} y={AXIS - 10} text-anchor="middle">
              +{span(t - model.start)}
            </text>
          </g>
        ))}
        {shown.map((row, i) => (
          <g key={`${row.run}:${row.index}`} class="row" data-run={row.run} data-index={row.index} data-step={row.name}>
            <rect class="row-bg" x={0} y={AXIS + i * ROW} width={width} height={ROW} />
            <text class="row-label" x={8} y={AXIS + i * ROW + ROW / 2 + 4}>
              {label(row, model.runs)}
            </text>
            {row.bars.map((bar, j) => (
              <BarShape
                key={j}
                bar={bar}
                row={row}
                y={AXIS + i * ROW + (ROW - BAR) / 2}
                x={x}
                edge={width - PAD}
                now={now}
              />
            ))}
          </g>
        ))}
        {model.marks.map((mark, i) =>
          mark.type === "pause" ? (
            <rect
              key={i}
              class="mark-pause"
              data-mark="pause"
              x={x(mark.start)}
              y={AXIS - 4}
              width={Math.max(2, x(mark.end) - x(mark.start))}
              height={height - AXIS + 4}
            >
              <title>
                {`paused ${when(new Date(mark.start), true)}${mark.open ? " (still paused)" : ` → ${when(new Date(mark.end), true)}, ${span(mark.end - mark.start)}`}`}
              </title>
            </rect>
          ) : (
            <g key={i} class="mark-restart" data-mark="restart">
              <line x1={x(mark.start)} x2={x(mark.start)} y1={AXIS - 6} y2={height} />
              <text x={x(mark.start) + 3} y={height - 2}>
                restart
              </text>
              <title>{`restarted ${when(new Date(mark.start), true)}`}</title>
            </g>
          ),
        )}
      </svg>
      <Legend />
    </div>
  );
}

function Legend() {
  const items: [string, string][] = [
    ["attempt outcome-succeeded", "attempt succeeded"],
    ["attempt outcome-retrying", "attempt failed"],
    ["attempt outcome-running", "attempt running"],
    ["attempt outcome-cut", "attempt cut short"],
    ["sleep", "sleep"],
    ["wait", "event wait"],
    ["pause", "paused"],
  ];
  return (
    <ul class="legend" aria-label="Legend">
      {items.map(([cls, text]) => (
        <li key={cls}>
          <svg width="14" height="10" aria-hidden="true">
            {cls === "pause" ? (
              <rect class="mark-pause" x="0.5" y="0.5" width="13" height="9" />
            ) : (
              <g class={`bar ${cls}`}>
                <rect x="0.5" y="0.5" width="13" height="9" rx="2" />
              </g>
            )}
          </svg>
          {text}
        </li>
      ))}
      <li>hover a bar for its times and error</li>
    </ul>
  );
}

function label(row: Row, runs: number): string {
  const name = row.occurrence > 1 ? `${row.name} #${row.occurrence}` : row.name;
  const text = runs > 1 ? `run ${row.run} · ${name}` : name;
  return text.length > 26 ? `${text.slice(0, 25)}…` : text;
}

function BarShape(props: { bar: Bar; row: Row; y: number; x: (t: number) => number; edge: number; now: number }) {
  const { bar, row, y, x, edge, now } = props;
  const x0 = x(bar.start);
  const x1 = Math.max(x0 + 3, x(bar.end));
  // The time left to a pending wake, up to the chart's edge.
  const planned =
    bar.open && bar.wake !== undefined && bar.wake > bar.end ? Math.max(x1, Math.min(x(bar.wake), edge)) : undefined;
  const common = {
    "data-type": bar.type,
    "data-outcome": bar.outcome,
    "data-attempt": bar.attempt,
    "data-step": row.name,
  };
  const title = describeBar(bar, row, now);
  if (bar.type === "backoff") {
    return (
      <rect class="bar backoff" x={x0} y={y + BAR / 2 - 1} width={Math.max(2, x1 - x0)} height={2} {...common}>
        <title>{title}</title>
      </rect>
    );
  }
  return (
    <g class={`bar ${bar.type} outcome-${bar.outcome}`} {...common}>
      <rect x={x0} y={y} width={x1 - x0} height={BAR} rx={2} />
      {planned !== undefined && <rect class="planned" x={x1} y={y} width={planned - x1} height={BAR} rx={2} />}
      <title>{title}</title>
    </g>
  );
}

function describeBar(bar: Bar, row: Row, now: number): string {
  const took = span((bar.open ? now : bar.end) - bar.start);
  const error = bar.error ? `\n${bar.error.name}: ${bar.error.message}` : "";
  const name = row.occurrence > 1 ? `${row.name} #${row.occurrence}` : row.name;
  switch (bar.type) {
    case "backoff":
      return `${name}: waiting to retry; attempt ${bar.attempt + 1} at ${when(new Date(bar.end), true)}`;
    case "sleep":
      return (
        `${name}: sleep from ${when(new Date(bar.start), true)}` +
        (bar.open
          ? `, wakes at ${bar.wake === undefined ? "?" : when(new Date(bar.wake), true)}`
          : `, woke after ${took}`)
      );
    case "wait": {
      const what = `${name}: wait for event${row.eventType ? ` '${row.eventType}'` : ""}`;
      if (bar.open) {
        return `${what} since ${when(new Date(bar.start), true)}${bar.wake === undefined ? "" : `, times out at ${when(new Date(bar.wake), true)}`}`;
      }
      return bar.outcome === "succeeded"
        ? `${what}: received after ${took}${bar.detail ? `\n${bar.detail}` : ""}`
        : `${what}: ${bar.outcome === "failed" ? "timed out" : bar.outcome} after ${took}${error}`;
    }
    default: {
      const outcome =
        bar.outcome === "retrying"
          ? "failed, retried"
          : bar.outcome === "cut"
            ? "cut short"
            : bar.outcome === "running"
              ? "running"
              : bar.outcome;
      return `${name}: attempt ${bar.attempt}, ${outcome}, ${bar.open ? `${took} so far` : took}${error}${bar.outcome === "succeeded" && bar.detail ? `\n→ ${bar.detail}` : ""}`;
    }
  }
}

/** Round tick times: about six, at 1-2-5 steps of a second, minute or hour. */
function axis(start: number, end: number): number[] {
  const steps = [
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 15_000, 30_000, 60_000, 120_000, 300_000,
    600_000, 900_000, 1_800_000, 3_600_000, 7_200_000, 21_600_000, 43_200_000, 86_400_000,
  ];
  const want = (end - start) / 6;
  const step = steps.find((s) => s >= want) ?? 86_400_000 * Math.ceil(want / 86_400_000);
  const ticks: number[] = [];
  for (let t = start; t <= end && ticks.length < 20; t += step) {
    ticks.push(t);
  }
  return ticks;
}
