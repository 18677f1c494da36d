/**
 * examples/node-app end to end: the built app (`make ts-test` builds it)
 * against a real server, over each transport, driven over HTTP as its users
 * would.
 */

import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { ROOT, Server, eventually, TRANSPORTS, uniqueId, type TransportName } from "./harness.js";

const APP = path.join(ROOT, "examples", "node-app", "dist", "server.js");

interface Status {
  id: string;
  status: string;
  output: { success: boolean; userId: string; projectId: string } | null;
  error: { name: string; message: string } | null;
}

/** The example app in a child process, on a free port. */
class App {
  url = "";
  #proc: ChildProcess | undefined;
  #log = "";

  async start(env: Record<string, string>): Promise<this> {
    const proc = spawn(process.execPath, [APP], {
      env: { ...process.env, PORT: "0", ...env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.#proc = proc;
    proc.stderr?.on("data", (chunk: Buffer) => (this.#log += chunk.toString()));
    await new Promise<void>((resolve, reject) => {
      proc.once("exit", (code) => reject(new Error(`node-app exited ${code}: ${this.#log}`)));
      proc.stdout?.on("data", (chunk: Buffer) => {
        this.#log += chunk.toString();
        const line = /node-app listening on (\S+)/.exec(this.#log);
        if (line) {
          this.url = line[1] as string;
          proc.removeAllListeners("exit");
          resolve();
        }
      });
    });
    return this;
  }

  async stop(): Promise<void> {
    const proc = this.#proc;
    if (proc === undefined || proc.exitCode !== null) {
      return;
    }
    const ended = new Promise((resolve) => proc.once("exit", resolve));
    proc.kill("SIGTERM");
    assert.equal(await ended, 0, `node-app exits 0 on SIGTERM: ${this.#log}`);
  }

  async request<T>(method: string, route: string, body?: unknown): Promise<{ status: number; body: T }> {
    const response = await fetch(this.url + route, {
      method,
      ...(body !== undefined && { body: JSON.stringify(body), headers: { "content-type": "application/json" } }),
    });
    return { status: response.status, body: (await response.json()) as T };
  }
}

let server: Server;

before(async () => {
  assert.ok(existsSync(APP), `${APP} is built (make ts-test builds it)`);
  server = await new Server().start();
});

after(async () => {
  await server.close();
});

function appEnv(transport: TransportName): Record<string, string> {
  return transport === "grpc" ? { CRUZFLOW_GRPC_URL: server.grpcUrl } : { CRUZFLOW_URL: server.httpUrl };
}

for (const transport of TRANSPORTS) {
  describe(`examples/node-app over ${transport}`, () => {
    test("trigger, then status until complete; the lookup key finds it again after a restart", async () => {
      const userId = uniqueId("u");
      let app = await new App().start(appEnv(transport));
      try {
        const started = await app.request<{ workflowId: string; created: boolean }>("POST", "/onboarding", {
          userId,
          email: "ada@example.com",
          plan: "pro",
        });
        assert.equal(started.status, 201);
        assert.equal(started.body.created, true);
        const { workflowId } = started.body;

        const done = await eventually(async () => {
          const answer = await app.request<Status>("GET", `/onboarding/${workflowId}`);
          assert.equal(answer.status, 200);
          assert.ok(["queued", "running", "complete"].includes(answer.body.status), answer.body.status);
          return answer.body.status === "complete" ? answer.body : undefined;
        });
        assert.equal(done.id, workflowId);
        assert.equal(done.error, null);
        assert.equal(done.output?.success, true);
        assert.equal(done.output?.userId, userId);

        // A second trigger for the same user is the same onboarding.
        const again = await app.request<{ workflowId: string; created: boolean }>("POST", "/onboarding", {
          userId,
          email: "ada@example.com",
        });
        assert.deepEqual(again, { status: 200, body: { workflowId, created: false } });

        // Its events, as server-sent events, end with the completion.
        const events = await fetch(`${app.url}/onboarding/${workflowId}/events`);
        assert.equal(events.headers.get("content-type"), "text/event-stream");
        const lines = (await events.text()).split("\n\n").filter(Boolean);
        const parsed = lines.map((l) => JSON.parse(l.replace(/^data: /, "")) as { kind: string; status?: string; sequence: number });
        assert.deepEqual(
          parsed.map((e) => e.sequence),
          parsed.map((_, i) => i + 1),
        );
        assert.deepEqual(parsed.at(-1)?.kind, "statusChanged");
        assert.equal(parsed.at(-1)?.status, "complete");

        // A restarted app has lost its in-memory table: the lookup key finds the instance.
        await app.stop();
        app = await new App().start(appEnv(transport));
        const byUser = await app.request<Status>("GET", `/users/${userId}/onboarding`);
        assert.equal(byUser.status, 200);
        assert.equal(byUser.body.id, workflowId);
        assert.equal(byUser.body.status, "complete");
        const third = await app.request<{ workflowId: string; created: boolean }>("POST", "/onboarding", {
          userId,
          email: "ada@example.com",
        });
        assert.deepEqual(third.body, { workflowId, created: false });
      } finally {
        await app.stop();
      }
    });

    test("refusals: unknown ids are 404, a bad body is 400", async () => {
      const app = await new App().start(appEnv(transport));
      try {
        const missing = await app.request<{ error: string; code: string }>("GET", "/onboarding/no-such-id");
        assert.equal(missing.status, 404);
        assert.equal(missing.body.code, "NOT_FOUND");
        assert.equal((await app.request("GET", `/users/${uniqueId("nobody")}/onboarding`)).status, 404);
        assert.equal((await app.request("GET", "/onboarding/no-such-id/events")).status, 404);
        const bad = await app.request<{ error: string }>("POST", "/onboarding", { userId: "x" });
        assert.equal(bad.status, 400);
        assert.match(bad.body.error, /^email:/);
      } finally {
        await app.stop();
      }
    });
  });
}
