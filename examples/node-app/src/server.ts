/**
 * A CruzJS-style Node service on plain `node:http`: it starts the onboarding
 * workflow for a user and reports its status, as the seed's tRPC router does.
 *
 *   POST /onboarding            {"userId", "email", "plan"?} -> {"workflowId", "created"}
 *   GET  /onboarding/:workflowId                             -> {"id", "status", "output", "error"}
 *   GET  /users/:userId/onboarding                           -> the same, found by user
 *   GET  /onboarding/:workflowId/events                      -> the events, as server-sent events
 *
 * Environment: CRUZFLOW_URL, the server's HTTP (Connect) listener (default
 * http://127.0.0.1:8080), or CRUZFLOW_GRPC_URL to speak gRPC to its main
 * listener instead; CRUZFLOW_TOKEN, a bearer token if the server wants one;
 * PORT (default 3000; 0 picks a free one) and HOST (default 127.0.0.1).
 */

import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import { Code, CruzflowError, createClient, type Client } from "@cruzflow/client";
import { createGrpcClient } from "@cruzflow/client/node";
import { OnboardingRouter } from "./onboarding.js";

function makeClient(): Client {
  const token = process.env["CRUZFLOW_TOKEN"] || undefined;
  const grpc = process.env["CRUZFLOW_GRPC_URL"];
  if (grpc) {
    return createGrpcClient({ baseUrl: grpc, token });
  }
  return createClient({ baseUrl: process.env["CRUZFLOW_URL"] ?? "http://127.0.0.1:8080", token });
}

// How a refused call reads to this service's own callers.
const HTTP_STATUS = new Map<Code | undefined, number>([
  [Code.NotFound, 404],
  [Code.InvalidArgument, 400],
  [Code.AlreadyExists, 409],
  [Code.FailedPrecondition, 409],
  [Code.Unauthenticated, 502], // our token is wrong: our fault, not the caller's
  [Code.PermissionDenied, 502],
  [Code.Unavailable, 503],
  [Code.DeadlineExceeded, 504],
]);

class BadRequest extends Error {}

function send(response: ServerResponse, status: number, body: unknown): void {
  response.writeHead(status, { "content-type": "application/json" });
  response.end(JSON.stringify(body));
}

async function readJson(request: IncomingMessage): Promise<Record<string, unknown>> {
  let text = "";
  for await (const chunk of request) {
    text += String(chunk);
    if (text.length > 64 * 1024) {
      throw new BadRequest("body over 64 KiB");
    }
  }
  try {
    const value: unknown = JSON.parse(text);
    if (typeof value === "object" && value !== null && !Array.isArray(value)) {
      return value as Record<string, unknown>;
    }
  } catch {
    // answered below
  }
  throw new BadRequest("the body must be a JSON object");
}

function text(body: Record<string, unknown>, key: string, fallback?: string): string {
  const value = body[key] ?? fallback;
  if (typeof value !== "string" || value === "") {
    throw new BadRequest(`${key}: a non-empty string is required`);
  }
  return value;
}

async function route(router: OnboardingRouter, request: IncomingMessage, response: ServerResponse): Promise<void> {
  const url = new URL(request.url ?? "/", "http://localhost");
  const parts = url.pathname.split("/").filter(Boolean).map(decodeURIComponent);
  const method = request.method ?? "GET";

  if (method === "POST" && parts.length === 1 && parts[0] === "onboarding") {
    const body = await readJson(request);
    const user = { id: text(body, "userId"), email: text(body, "email") };
    const started = await router.startOnboarding(user, text(body, "plan", "pro"));
    send(response, started.created ? 201 : 200, started);
    return;
  }
  if (method === "GET" && parts.length === 2 && parts[0] === "onboarding") {
    send(response, 200, await router.checkOnboardingStatus(parts[1] as string));
    return;
  }
  if (method === "GET" && parts.length === 3 && parts[0] === "users" && parts[2] === "onboarding") {
    const workflowId = await router.findOnboarding(parts[1] as string);
    if (workflowId === undefined) {
      send(response, 404, { error: `no onboarding for user ${parts[1]}` });
      return;
    }
    send(response, 200, await router.checkOnboardingStatus(workflowId));
    return;
  }
  if (method === "GET" && parts.length === 3 && parts[0] === "onboarding" && parts[2] === "events") {
    const gone = new AbortController();
    response.on("close", () => gone.abort());
    const events = router.watch(parts[1] as string, gone.signal);
    // The first event (or refusal) decides the answer's status.
    const first = await events.next();
    response.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-store" });
    if (!first.done) {
      response.write(`data: ${JSON.stringify(first.value)}\n\n`);
      for await (const event of events) {
        response.write(`data: ${JSON.stringify(event)}\n\n`);
      }
    }
    response.end();
    return;
  }
  send(response, 404, { error: `no route ${method} ${url.pathname}` });
}

const router = new OnboardingRouter(makeClient());
const server = createServer((request, response) => {
  route(router, request, response).catch((error: unknown) => {
    if (response.headersSent) {
      response.destroy();
    } else if (error instanceof BadRequest) {
      send(response, 400, { error: error.message });
    } else if (error instanceof CruzflowError) {
      send(response, HTTP_STATUS.get(error.code) ?? 500, { error: error.details, code: error.codeName });
    } else {
      console.error(error);
      send(response, 500, { error: "internal error" });
    }
  });
});

server.listen(Number(process.env["PORT"] ?? 3000), process.env["HOST"] ?? "127.0.0.1", () => {
  const address = server.address();
  if (address !== null && typeof address === "object") {
    console.log(`node-app listening on http://${address.address}:${address.port}`);
  }
});
for (const signal of ["SIGINT", "SIGTERM"] as const) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  });
}
