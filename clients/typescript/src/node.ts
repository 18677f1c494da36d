/**
 * The cruzflow client over gRPC, on Node (HTTP/2 through `node:http2`): the
 * server's main listener, the one `grpcurl` and the Python client use.
 * Everything `@cruzflow/client` exports is exported here too.
 *
 * ```ts
 * import { createGrpcClient } from "@cruzflow/client/node";
 *
 * const client = createGrpcClient({ baseUrl: "http://127.0.0.1:50051" });
 * try {
 *   console.log(await client.listWorkflows());
 * } finally {
 *   client.close();
 * }
 * ```
 *
 * @module
 */

import type { SecureClientSessionOptions } from "node:http2";
import type { Interceptor } from "@connectrpc/connect";
import { Http2SessionManager, createGrpcTransport } from "@connectrpc/connect-node";
import { Client, type ClientOptions } from "./client.js";

export * from "./index.js";

/** Options of {@link createGrpcClient}. */
export interface GrpcClientOptions extends ClientOptions {
  /**
   * The server's gRPC listener: `"http://127.0.0.1:50051"`, or
   * `"https://..."` for one with TLS (a bare `"host:port"` means `http://`).
   */
  baseUrl: string;
  /**
   * Options of `http2.connect`: for TLS, `ca` (the server's CA, PEM) and
   * `cert`/`key` for a client certificate.
   */
  nodeOptions?: SecureClientSessionOptions | undefined;
  /** Connect interceptors, e.g. for tracing headers. */
  interceptors?: Interceptor[] | undefined;
}

/** A {@link Client} over gRPC that owns its HTTP/2 connection: `close()` it when done. */
export class GrpcClient extends Client {
  readonly #session: Http2SessionManager;

  constructor(options: GrpcClientOptions) {
    const baseUrl = options.baseUrl.includes("://") ? options.baseUrl : `http://${options.baseUrl}`;
    // Our own session manager, so that close() can end the connection:
    // otherwise it lingers until its idle timeout and keeps Node running.
    const session = new Http2SessionManager(baseUrl, {}, options.nodeOptions);
    super(
      createGrpcTransport({
        baseUrl,
        sessionManager: session,
        ...(options.interceptors && { interceptors: options.interceptors }),
      }),
      options,
    );
    this.#session = session;
  }

  /** Closes the connection; calls in flight fail. Closing twice is harmless. */
  close(): void {
    this.#session.abort();
  }

  [Symbol.asyncDispose](): Promise<void> {
    this.close();
    return Promise.resolve();
  }
}

/** A client over gRPC (HTTP/2), for Node. */
export function createGrpcClient(options: GrpcClientOptions): GrpcClient {
  return new GrpcClient(options);
}
