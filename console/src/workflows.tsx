/**
 * The workflows the server hosts, with their instances per status and the
 * share of finished ones that failed, over a chosen window: ListWorkflows and
 * one CountInstances.
 */

import { useEffect, useRef, useState } from "preact/hooks";
import { INSTANCE_STATUSES, type WorkflowInfo } from "@cruzflow/client";
import { countInstances, describe, type Counts } from "./api";
import { STATUS_WORDS } from "./format";
import type { Session } from "./main";
import { Alert, usePoll } from "./ui";

const WINDOWS: Record<string, number | undefined> = {
  "1h": 3_600_000,
  "24h": 86_400_000,
  "7d": 7 * 86_400_000,
  all: undefined,
};

export function WorkflowsPage({ session }: { session: Session }) {
  const { client } = session;
  const [windowName, setWindowName] = useState("24h");
  const [workflows, setWorkflows] = useState<WorkflowInfo[] | undefined>();
  const [counts, setCounts] = useState<Counts | undefined>();
  const [error, setError] = useState<string | undefined>();

  // The newest load wins (the window may change while one is out).
  const latest = useRef(0);
  const load = async (): Promise<void> => {
    const mine = ++latest.current;
    const ms = WINDOWS[windowName];
    try {
      const [listed, counted] = await Promise.all([
        client.listWorkflows(),
        countInstances(client, ms === undefined ? {} : { createTimeMin: new Date(Date.now() - ms) }),
      ]);
      if (mine === latest.current) {
        setWorkflows(listed);
        setCounts(counted);
        setError(undefined);
      }
    } catch (e) {
      if (mine === latest.current) {
        setError(describe(e));
      }
    }
  };
  useEffect(() => void load(), [windowName]);
  usePoll(() => void load(), 5_000, true);

  return (
    <section>
      <div class="page-head">
        <h1>Workflows</h1>
        <label>
          Created in the last{" "}
          <select name="window" value={windowName} onChange={(e) => setWindowName(e.currentTarget.value)}>
            {Object.keys(WINDOWS).map((w) => (
              <option key={w} value={w}>
                {w === "all" ? "any time" : w}
              </option>
            ))}
          </select>
        </label>
      </div>
      <Alert message={error} />
      <table class="workflows">
        <thead>
          <tr>
            <th>Workflow</th>
            <th>Binding</th>
            <th>Class</th>
            {INSTANCE_STATUSES.map((s) => (
              <th key={s} class="num">
                {STATUS_WORDS[s]}
              </th>
            ))}
            <th class="num" title="errored / (complete + errored + terminated)">
              failure rate
            </th>
          </tr>
        </thead>
        <tbody>
          {workflows?.map((w) => {
            const mine = counts?.byWorkflow.get(w.name);
            const n = (s: (typeof INSTANCE_STATUSES)[number]): number => mine?.get(s) ?? 0;
            const done = n("complete") + n("errored") + n("terminated");
            return (
              <tr key={w.name} data-workflow={w.name}>
                <td>
                  <a href={`#/instances?workflow=${encodeURIComponent(w.name)}`}>{w.name}</a>
                </td>
                <td class="mono">{w.binding}</td>
                <td class="mono small">{w.className}</td>
                {INSTANCE_STATUSES.map((s) => (
                  <td key={s} class={`num${n(s) === 0 ? " zero" : ""}`} data-status={s}>
                    {n(s) === 0 ? (
                      "0"
                    ) : (
                      <a href={`#/instances?workflow=${encodeURIComponent(w.name)}&status=${s}`}>{n(s)}</a>
                    )}
                  </td>
                ))}
                <td class="num" data-testid="failure-rate">
                  {done === 0 ? "—" : `${((100 * n("errored")) / done).toFixed(1)}%`}
                </td>
              </tr>
            );
          })}
        </tbody>
      </table>
      {workflows?.length === 0 && <p class="muted">This server hosts no workflows (or none this token may see).</p>}
    </section>
  );
}
