/**
 * The instances: newest first, filtered by workflow, status, lookup key and
 * creation time, paged with the server's page tokens, with the count of each
 * status for the same filters. Two calls per view (ListInstances and
 * CountInstances), repeated every few seconds while the tab is visible and
 * "live" is checked. While it is, the unfinished instances on the page are
 * followed with one WatchInstances stream (`client.watchMany`), so that
 * their rows change as their events happen, between two refreshes.
 */

import { useEffect, useMemo, useRef, useState } from "preact/hooks";
import {
  INSTANCE_STATUSES,
  isFinished,
  type Client,
  type InstanceInfo,
  type InstanceStatus,
  type WatchEvent,
  type WorkflowInfo,
} from "@cruzflow/client";
import { countInstances, describe, type Counts } from "./api";
import { ago, fromLocalInput, span, STATUS_WORDS, toLocalInput, when } from "./format";
import type { Session } from "./main";
import { Alert, Status, usePoll } from "./ui";

const PAGE_SIZE = 50;
const REFRESH_MS = 2_000;

interface Filters {
  readonly workflow: string;
  readonly statuses: readonly InstanceStatus[];
  readonly lookupKey: string;
  readonly from: Date | undefined;
  readonly to: Date | undefined;
}

function parse(query: URLSearchParams, caller: Session["caller"]): Filters {
  const statuses = (query.get("status") ?? "")
    .split(",")
    .filter((s): s is InstanceStatus => (INSTANCE_STATUSES as readonly string[]).includes(s));
  const workflow = query.get("workflow") ?? (caller.workflows.length > 0 ? (caller.workflows[0] ?? "") : "");
  const date = (name: string): Date | undefined => {
    const text = query.get(name);
    const value = text ? new Date(text) : undefined;
    return value && !Number.isNaN(value.getTime()) ? value : undefined;
  };
  return { workflow, statuses, lookupKey: query.get("key") ?? "", from: date("from"), to: date("to") };
}

function href(filters: Filters): string {
  const query = new URLSearchParams();
  if (filters.workflow) query.set("workflow", filters.workflow);
  if (filters.statuses.length) query.set("status", filters.statuses.join(","));
  if (filters.lookupKey) query.set("key", filters.lookupKey);
  if (filters.from) query.set("from", filters.from.toISOString());
  if (filters.to) query.set("to", filters.to.toISOString());
  const text = query.toString();
  return `#/instances${text ? `?${text}` : ""}`;
}

export function InstancesPage({ session, query }: { session: Session; query: URLSearchParams }) {
  const { client, caller } = session;
  const filters = useMemo(() => parse(query, caller), [query.toString(), caller]);
  const [workflows, setWorkflows] = useState<WorkflowInfo[]>([]);
  // The tokens of the pages before this one: [""] is the first page.
  const [tokens, setTokens] = useState<string[]>([""]);
  const [page, setPage] = useState<{ instances: readonly InstanceInfo[]; next: string } | undefined>();
  const [counts, setCounts] = useState<Counts | undefined>();
  const [error, setError] = useState<string | undefined>();
  const [live, setLive] = useState(true);
  // What is typed in the key field, applied on Enter or when it loses focus.
  const [keyText, setKeyText] = useState(filters.lookupKey);
  useEffect(() => setKeyText(filters.lookupKey), [filters.lookupKey]);
  const pageToken = tokens[tokens.length - 1] ?? "";

  useEffect(() => {
    client.listWorkflows().then(setWorkflows, (e: unknown) => setError(describe(e)));
  }, [client]);

  useEffect(() => setTokens([""]), [filters]);

  const filter = {
    ...(filters.workflow && { workflow: filters.workflow }),
    ...(filters.lookupKey && { lookupKey: filters.lookupKey }),
    ...(filters.from && { createTimeMin: filters.from }),
    ...(filters.to && { createTimeMax: filters.to }),
  };

  // The newest load wins: an answer to an older one (other filters, or a
  // refresh overtaken by a filter change) is dropped; a refresh is skipped
  // while a load is out.
  const latest = useRef(0);
  const inFlight = useRef(false);
  const load = async (refresh: boolean): Promise<void> => {
    if (refresh && inFlight.current) {
      return;
    }
    const mine = ++latest.current;
    inFlight.current = true;
    try {
      const [listed, counted] = await Promise.all([
        client.listInstancesPage({
          ...filter,
          ...(filters.statuses.length && { status: filters.statuses }),
          pageSize: PAGE_SIZE,
          pageToken,
        }),
        countInstances(client, filter),
      ]);
      if (mine === latest.current) {
        setPage({ instances: listed.instances, next: listed.nextPageToken });
        setCounts(counted);
        setError(undefined);
      }
    } catch (e) {
      if (mine === latest.current) {
        setError(describe(e));
      }
    } finally {
      if (mine === latest.current) {
        inFlight.current = false;
      }
    }
  };

  useEffect(() => {
    setPage(undefined);
    void load(false);
  }, [filters, pageToken]);
  usePoll(() => void load(true), REFRESH_MS, live);
  const { rows, following } = useFollow(client, page?.instances, live);

  const go = (next: Partial<Filters>): void => {
    window.location.hash = href({ ...filters, ...next });
  };
  const toggle = (status: InstanceStatus): void => {
    const has = filters.statuses.includes(status);
    go({ statuses: has ? filters.statuses.filter((s) => s !== status) : [...filters.statuses, status] });
  };
  const total = counts?.total ?? 0;

  return (
    <section>
      <div class="page-head">
        <h1>Instances</h1>
        <form
          class="open-id"
          aria-label="Open an instance"
          onSubmit={(e) => {
            e.preventDefault();
            const id = new FormData(e.currentTarget).get("instanceId");
            if (typeof id === "string" && id.trim()) {
              window.location.hash = `#/instances/${encodeURIComponent(id.trim())}`;
            }
          }}
        >
          <input name="instanceId" type="search" placeholder="Open an instance by id" aria-label="Instance id" />
        </form>
        <label
          class="live"
          data-following={following}
          title={following ? `Following ${following} unfinished instance${following === 1 ? "" : "s"}` : ""}
        >
          <input type="checkbox" checked={live} onChange={(e) => setLive(e.currentTarget.checked)} /> live
        </label>
      </div>
      <form class="filters" aria-label="Filters" onSubmit={(e) => e.preventDefault()}>
        <label>
          Workflow
          <select
            name="workflow"
            value={filters.workflow}
            onChange={(e) => go({ workflow: e.currentTarget.value })}
          >
            {caller.workflows.length === 0 && <option value="">any</option>}
            {workflows.map((w) => (
              <option key={w.name} value={w.name}>
                {w.name}
              </option>
            ))}
          </select>
        </label>
        <label>
          Lookup key
          <input
            name="lookupKey"
            type="search"
            placeholder="user:42"
            value={keyText}
            onInput={(e) => setKeyText(e.currentTarget.value)}
            onChange={(e) => go({ lookupKey: e.currentTarget.value.trim() })}
            onKeyDown={(e) => e.key === "Enter" && go({ lookupKey: e.currentTarget.value.trim() })}
          />
        </label>
        <label>
          Created from
          <input
            name="from"
            type="datetime-local"
            value={toLocalInput(filters.from)}
            onChange={(e) => go({ from: fromLocalInput(e.currentTarget.value) })}
          />
        </label>
        <label>
          to
          <input
            name="to"
            type="datetime-local"
            value={toLocalInput(filters.to)}
            onChange={(e) => go({ to: fromLocalInput(e.currentTarget.value) })}
          />
        </label>
        {(filters.statuses.length > 0 || filters.lookupKey || filters.from || filters.to) && (
          <button
            type="button"
            class="link"
            onClick={() => go({ statuses: [], lookupKey: "", from: undefined, to: undefined })}
          >
            Clear filters
          </button>
        )}
      </form>
      <div class="counts" role="group" aria-label="Counts per status">
        <span class="count-total" data-testid="count-total">
          {total} instance{total === 1 ? "" : "s"}
        </span>
        {INSTANCE_STATUSES.map((status) => {
          const n = counts?.byStatus.get(status) ?? 0;
          const on = filters.statuses.includes(status);
          return (
            <button
              type="button"
              key={status}
              class={`count status-${status}${on ? " on" : ""}${n === 0 ? " zero" : ""}`}
              aria-pressed={on}
              data-status={status}
              data-count={n}
              onClick={() => toggle(status)}
              title={on ? `Stop filtering by ${STATUS_WORDS[status]}` : `Show only ${STATUS_WORDS[status]}`}
            >
              {STATUS_WORDS[status]} <b>{n}</b>
            </button>
          );
        })}
      </div>
      <Alert message={error} />
      <table class="instances">
        <thead>
          <tr>
            <th>Instance</th>
            <th>Workflow</th>
            <th>Status</th>
            <th>Lookup key</th>
            <th>Created</th>
            <th>Ran for</th>
          </tr>
        </thead>
        <tbody>
          {rows?.map((i) => (
            <tr key={i.id} data-instance={i.id}>
              <td>
                <a href={`#/instances/${encodeURIComponent(i.id)}`}>{i.id}</a>
              </td>
              <td>{i.workflow}</td>
              <td title={`updated ${when(i.updateTime, true)}`}>
                <Status status={i.status} />
              </td>
              <td>{i.lookupKey ?? ""}</td>
              <td title={when(i.createTime, true)}>{ago(i.createTime)}</td>
              <td>{ranFor(i)}</td>
            </tr>
          ))}
        </tbody>
      </table>
      {page && page.instances.length === 0 && <p class="muted empty">No instances match these filters.</p>}
      {page === undefined && !error && <p class="muted">Loading…</p>}
      <div class="pager">
        <button type="button" disabled={tokens.length < 2} onClick={() => setTokens(tokens.slice(0, -1))}>
          ← Newer
        </button>
        <span class="muted" data-testid="page-number">
          page {tokens.length}
        </span>
        <button type="button" disabled={!page?.next} onClick={() => page && setTokens([...tokens, page.next])}>
          Older →
        </button>
      </div>
    </section>
  );
}

function ranFor(i: InstanceInfo): string {
  const start = i.startTime ?? i.createTime;
  if (start === undefined) {
    return "—";
  }
  const end = i.endTime?.getTime() ?? Date.now();
  return span(Math.max(0, end - start.getTime())) + (i.endTime ? "" : " so far");
}

// How long events gather before the rows are drawn again.
const FLUSH_MS = 50;

interface Stream {
  readonly stop: AbortController;
  /** The instances it follows whose final event has not come yet. */
  readonly open: Set<string>;
}

/**
 * The page's rows, each as the newest of the list's answer and the events
 * followed since. While `live`, the unfinished instances of `listed` are
 * followed with one WatchInstances stream from the sequence the list saw.
 * It is kept while the list brings no instance it does not follow and it
 * follows none that left the page; else it is aborted and another opened
 * for the new set. It ends by itself once every one has ended. A stream
 * that fails is left for the next refresh to open again: the list still
 * refreshes meanwhile.
 */
function useFollow(
  client: Client,
  listed: readonly InstanceInfo[] | undefined,
  live: boolean,
): { rows: readonly InstanceInfo[] | undefined; following: number } {
  // The rows as the events left them, while newer than the list's answer.
  const folded = useRef(new Map<string, InstanceInfo>());
  const latest = useRef(new Map<string, InstanceInfo>());
  const stream = useRef<Stream | undefined>();
  const [following, setFollowing] = useState(0);
  const [, setDrawn] = useState(0);

  useEffect(
    () => () => {
      const current = stream.current;
      stream.current = undefined;
      current?.stop.abort();
    },
    [],
  );

  useEffect(() => {
    const byId = new Map((listed ?? []).map((i) => [i.id, i]));
    latest.current = byId;
    for (const [id, row] of folded.current) {
      const answer = byId.get(id);
      if (answer === undefined || answer.lastSequence >= row.lastSequence) {
        folded.current.delete(id);
      }
    }
    const wanted = [...byId.values()]
      .map((i) => newer(i, folded.current.get(i.id)))
      .filter((i) => !isFinished(i.status));
    const current = stream.current;
    if (
      live &&
      current !== undefined &&
      wanted.every((i) => current.open.has(i.id)) &&
      [...current.open].every((id) => byId.has(id))
    ) {
      return;
    }
    stream.current = undefined;
    current?.stop.abort();
    if (!live || wanted.length === 0) {
      setFollowing(0);
      return;
    }
    const mine: Stream = { stop: new AbortController(), open: new Set(wanted.map((i) => i.id)) };
    stream.current = mine;
    setFollowing(mine.open.size);
    // The rows are drawn again at most every FLUSH_MS, however many events
    // come; events that came just before an abort are still drawn.
    let flush: number | undefined;
    const draw = (): void => {
      flush = undefined;
      if (stream.current === mine) {
        setFollowing(mine.open.size);
      }
      setDrawn((n) => n + 1);
    };
    (async () => {
      try {
        const cursors = wanted.map((i) => ({ id: i.id, afterSequence: i.lastSequence }));
        for await (const event of client.watchMany(cursors, { signal: mine.stop.signal })) {
          // As the client counts them: a restart may follow an end.
          if (event.kind === "statusChanged" && event.isFinal) {
            mine.open.delete(event.instanceId);
          } else {
            mine.open.add(event.instanceId);
          }
          // An event the list's answer has seen already is skipped, and one
          // of an instance no longer on the page is dropped.
          const answer = latest.current.get(event.instanceId);
          const row = answer && newer(answer, folded.current.get(event.instanceId));
          if (row !== undefined && event.sequence > row.lastSequence) {
            folded.current.set(event.instanceId, fold(row, event));
          }
          flush ??= window.setTimeout(draw, FLUSH_MS);
        }
      } catch {
        // Aborted for another set, or a cut the client's reconnections did
        // not mend: the next refresh opens another stream.
      } finally {
        if (stream.current === mine) {
          stream.current = undefined;
          setFollowing(0);
        }
      }
    })();
  }, [listed, live]);

  return { rows: listed?.map((i) => newer(i, folded.current.get(i.id))), following };
}

/** Of the list's row and the events' row of one instance, the one that has seen more events. */
function newer(a: InstanceInfo, b: InstanceInfo | undefined): InstanceInfo {
  return b !== undefined && b.lastSequence > a.lastSequence ? b : a;
}

/**
 * A row with one more event: what a listing shows of it (the status, the
 * update time, the end), as `cruzflow watch` folds events into its view.
 */
function fold(row: InstanceInfo, event: WatchEvent): InstanceInfo {
  const moved = { ...row, lastSequence: event.sequence, updateTime: event.time ?? row.updateTime };
  if (event.kind !== "statusChanged") {
    return moved;
  }
  return {
    ...moved,
    status: event.status,
    endTime: event.isFinal ? (event.time ?? row.endTime) : undefined,
    ...(event.status === "complete" && { output: event.output }),
    ...(event.error !== undefined && { error: event.error }),
  };
}
