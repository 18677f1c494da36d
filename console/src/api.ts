/**
 * The console's one way to the server: the public TypeScript client over
 * Connect (JSON over fetch), at the origin that served the page. A token is
 * kept in this tab's sessionStorage only (never in a URL, never in
 * localStorage or a cookie) and sent as a bearer token.
 */

import { Code, CruzflowError, createClient, type CallerInfo, type Client, type InstanceStatus } from "@cruzflow/client";

const TOKEN_KEY = "cruzflow.token";

/** What the caller's token may do (GetCaller). */
export type Caller = CallerInfo;

export function storedToken(): string | undefined {
  try {
    return sessionStorage.getItem(TOKEN_KEY) ?? undefined;
  } catch {
    return undefined;
  }
}

export function storeToken(token: string | undefined): void {
  try {
    if (token === undefined) {
      sessionStorage.removeItem(TOKEN_KEY);
    } else {
      sessionStorage.setItem(TOKEN_KEY, token);
    }
  } catch {
    // Storage refused (a private window): the token lives in memory only.
  }
}

export function connect(token: string | undefined): Client {
  return createClient({
    baseUrl: window.location.origin,
    token,
    // The console's own calls fail fast; its watch reconnects on its own.
    timeoutMs: 15_000,
  });
}

export async function whoAmI(client: Client): Promise<Caller> {
  return client.caller();
}

/** The words to show for a refused call: the server's own message. */
export function describe(error: unknown): string {
  if (error instanceof CruzflowError) {
    return error.codeName === undefined ? error.details : `${error.codeName}: ${error.details}`;
  }
  return error instanceof Error ? error.message : String(error);
}

export function isUnauthenticated(error: unknown): boolean {
  return error instanceof CruzflowError && error.code === Code.Unauthenticated;
}

/** The counts of CountInstances, per status (summed over workflows) and per workflow. */
export interface Counts {
  readonly total: number;
  readonly byStatus: ReadonlyMap<InstanceStatus, number>;
  readonly byWorkflow: ReadonlyMap<string, ReadonlyMap<InstanceStatus, number>>;
}

export interface CountFilter {
  readonly workflow?: string;
  readonly lookupKey?: string;
  readonly createTimeMin?: Date;
  readonly createTimeMax?: Date;
}

export async function countInstances(client: Client, filter: CountFilter): Promise<Counts> {
  const rows = await client.countInstances(filter);
  const byStatus = new Map<InstanceStatus, number>();
  const byWorkflow = new Map<string, Map<InstanceStatus, number>>();
  let total = 0;
  for (const row of rows.counts) {
    byStatus.set(row.status, (byStatus.get(row.status) ?? 0) + row.count);
    let mine = byWorkflow.get(row.workflow);
    if (mine === undefined) {
      mine = new Map();
      byWorkflow.set(row.workflow, mine);
    }
    mine.set(row.status, row.count);
    total += row.count;
  }
  return { total, byStatus, byWorkflow };
}
