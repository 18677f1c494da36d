/**
 * The cruzflow client on `fetch`, speaking the Connect protocol to the
 * server's HTTP listener: it runs in Cloudflare Workers, browsers, Deno and
 * Node 20+. For gRPC on Node, see `@cruzflow/client/node`.
 *
 * ```ts
 * import { createClient } from "@cruzflow/client";
 *
 * const client = createClient({ baseUrl: "http://127.0.0.1:8080", token: env.CRUZFLOW_TOKEN });
 * const instance = await client.workflow("onboarding-workflow").create({ userId: "42" });
 * ```
 *
 * @module
 */

import type { Interceptor } from "@connectrpc/connect";
import { createConnectTransport, type ConnectTransportOptions } from "@connectrpc/connect-web";
import { Client, type ClientOptions } from "./client.js";

export {
  Client,
  InstanceHandle,
  MAX_WATCHED,
  WorkflowBinding,
  type CallOptions,
  type ClientOptions,
  type CreateOptions,
  type InstanceFilter,
  type NewInstance,
  type RepairOptions,
  type RestartOptions,
  type RunOptions,
  type ScheduleOptions,
  type WaitOptions,
  type WatchCursor,
  type WatchManyOptions,
  type WatchOptions,
} from "./client.js";
export * from "./errors.js";
export { DEFAULT_RECONNECT, DEFAULT_RETRY, type RetryPolicy } from "./retry.js";
export * from "./types.js";

/** Options of {@link createClient}. */
export interface ConnectClientOptions extends ClientOptions {
  /** The server's HTTP listener, e.g. `"http://127.0.0.1:8080"` (its `[http] listen`). */
  baseUrl: string;
  /**
   * The `fetch` to call with, e.g. a Worker's service binding
   * (`env.CRUZFLOW.fetch.bind(env.CRUZFLOW)`); default `globalThis.fetch`.
   */
  fetch?: ConnectTransportOptions["fetch"] | undefined;
  /** Send binary protobuf instead of JSON (smaller; JSON is easier to debug). */
  useBinaryFormat?: boolean | undefined;
  /** Connect interceptors, e.g. for tracing headers. */
  interceptors?: Interceptor[] | undefined;
}

/** A client speaking the Connect protocol over `fetch` to the server's HTTP listener. */
export function createClient(options: ConnectClientOptions): Client {
  const transport = createConnectTransport({
    baseUrl: options.baseUrl,
    useBinaryFormat: options.useBinaryFormat ?? false,
    ...(options.fetch && { fetch: options.fetch }),
    ...(options.interceptors && { interceptors: options.interceptors }),
  });
  return new Client(transport, options);
}
