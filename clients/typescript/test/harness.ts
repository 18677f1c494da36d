/**
 * Real `cruzflow serve` processes for the tests, and clients on them over
 * both transports: gRPC (connect-node) and Connect over fetch (the server's
 * HTTP listener, `--http-listen`).
 */

import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync, openSync, closeSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import type { Interceptor } from "@connectrpc/connect";
import { createClient, type Client, type ClientOptions, type WatchEvent } from "../src/index.js";
import { createGrpcClient } from "../src/node.js";

/** The repository's root (this file is built to clients/typescript/build/test/). */
export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../../..");
export const CRUZFLOW_BIN = path.resolve(
  ROOT,
  process.env["CRUZFLOW_BIN"] ?? path.join(".venv", "bin", "cruzflow"),
);

/** The workflows every test server hosts: the test suite's and the onboarding example. */
const WORKFLOWS: Record<string, string> = {
  "three-steps": "tests.workflows:ThreeSteps",
  raises: "tests.workflows:Raises",
  approval: "tests.workflows:Approval",
  steps5: "tests.workflows:Steps5",
  naps: "tests.workflows:Naps",
  parent: "tests.workflows:Parent",
  kid: "tests.workflows:Kid",
  "onboarding-workflow": "onboarding.workflow:OnboardingWorkflow",
};

export type TransportName = "grpc" | "connect";

// Servers still running when the test process ends (a crash, a failed
// before()) are killed with it rather than left behind.
const live = new Set<ChildProcess>();
process.on("exit", () => {
  for (const proc of live) {
    proc.kill("SIGKILL");
  }
});

/** Every suite runs over each of these. */
export const TRANSPORTS: readonly TransportName[] = ["grpc", "connect"];

/** A token the test server accepts: its name, access and workflows. */
export interface TokenSpec {
  name: string;
  secret: string;
  access: "read" | "write";
  workflows?: string[];
}

export interface ServerOptions {
  tokens?: TokenSpec[];
  /** The config's [limits], e.g. `{ max_watchers: 1 }`. */
  limits?: Record<string, number>;
}

/** `cruzflow serve` in a child process on a fresh folder; the same ports across restarts. */
export class Server {
  readonly dir: string;
  readonly config: string;
  readonly logPath: string;
  readonly env: NodeJS.ProcessEnv;
  grpcAddress = "";
  httpAddress = "";
  #proc: ChildProcess | undefined;
  #clients: { close?: () => void }[] = [];

  constructor(options: ServerOptions = {}) {
    this.dir = mkdtempSync(path.join(tmpdir(), "cruzflow-ts-"));
    this.config = path.join(this.dir, "cruzflow.toml");
    this.logPath = path.join(this.dir, "server.log");
    const env: NodeJS.ProcessEnv = { ...process.env };
    const lines = [
      'name = "cruzflow-ts-test"',
      `python_path = [${JSON.stringify(ROOT)}, ${JSON.stringify(path.join(ROOT, "examples"))}]`,
      "[server]",
      'listen = "127.0.0.1:0"',
      'grace_period = "2 seconds"',
      "[store]",
      'path = "x.db"',
      "[limits]",
      ...Object.entries(options.limits ?? {}).map(([key, value]) => `${key} = ${value}`),
    ];
    for (const [name, target] of Object.entries(WORKFLOWS)) {
      const binding = name.toUpperCase().replace(/-/g, "_");
      lines.push("[[workflows]]", `binding = "${binding}"`, `name = "${name}"`, `class_name = "${target}"`);
    }
    lines.push("[[sqlite_databases]]", 'binding = "DB"', 'path = "app.db"');
    lines.push("[vars]", 'EMAIL_API_URL = "outbox:"', 'EMAIL_API_KEY = "re_test"');
    for (const [i, token] of (options.tokens ?? []).entries()) {
      const variable = `CRUZFLOW_TS_TOKEN_${i}`;
      env[variable] = token.secret;
      lines.push(
        "[[auth.tokens]]",
        `name = ${JSON.stringify(token.name)}`,
        `env = "${variable}"`,
        `access = "${token.access}"`,
      );
      if (token.workflows) {
        lines.push(`workflows = ${JSON.stringify(token.workflows)}`);
      }
    }
    writeFileSync(this.config, lines.join("\n") + "\n");
    this.env = env;
  }

  get grpcUrl(): string {
    return `http://${this.grpcAddress}`;
  }

  get httpUrl(): string {
    return `http://${this.httpAddress}`;
  }

  /** Starts the server and resolves once every listener it has is up. */
  async start(timeoutMs = 30_000): Promise<this> {
    if (this.#proc !== undefined) {
      throw new Error("the server is running already: kill() or stop() it first");
    }
    const args = [
      "serve",
      "--config",
      this.config,
      "--listen",
      this.grpcAddress || "127.0.0.1:0",
      "--http-listen",
      this.httpAddress || "127.0.0.1:0",
    ];
    const log = openSync(this.logPath, "a");
    const proc = spawn(CRUZFLOW_BIN, args, { cwd: this.dir, env: this.env, stdio: ["ignore", "pipe", log] });
    closeSync(log);
    this.#proc = proc;
    live.add(proc);
    proc.once("exit", () => live.delete(proc));
    await new Promise<void>((resolve, reject) => {
      let out = "";
      const timer = setTimeout(() => fail(`no "listening" line within ${timeoutMs} ms`), timeoutMs);
      const fail = (why: string): void => {
        clearTimeout(timer);
        this.#proc = undefined;
        proc.kill("SIGKILL");
        reject(new Error(`cruzflow serve: ${why}\n--- stdout\n${out}\n--- log\n${this.log()}`));
      };
      const onExit = (code: number | null, signal: NodeJS.Signals | null): void =>
        fail(`exited (${code ?? signal}) before listening`);
      proc.once("exit", onExit);
      proc.stdout?.setEncoding("utf8");
      proc.stdout?.on("data", (chunk: string) => {
        out += chunk;
        const grpc = /^cruzflow listening on (\S+)$/m.exec(out);
        const httpLine = /^cruzflow http listening on (\S+)$/m.exec(out);
        if (grpc && httpLine) {
          this.grpcAddress = grpc[1] as string;
          this.httpAddress = httpLine[1] as string;
          clearTimeout(timer);
          proc.off("exit", onExit);
          resolve();
        }
      });
    });
    return this;
  }

  /** Kills the server with SIGKILL, as a crash would, and waits for its end. */
  async kill(): Promise<void> {
    await this.#end("SIGKILL");
  }

  /** Stops the server with SIGTERM (graceful) and waits for its end. */
  async stop(): Promise<void> {
    await this.#end("SIGTERM");
  }

  async #end(signal: NodeJS.Signals): Promise<void> {
    const proc = this.#proc;
    this.#proc = undefined;
    if (proc === undefined || proc.exitCode !== null || proc.signalCode !== null) {
      return;
    }
    const ended = new Promise<void>((resolve) => proc.once("exit", () => resolve()));
    proc.kill(signal);
    await ended;
  }

  /** A client on this server over `transport`; closed by `close()`. */
  client(
    transport: TransportName,
    options: ClientOptions & { interceptors?: Interceptor[] | undefined } = {},
  ): Client {
    if (transport === "grpc") {
      const client = createGrpcClient({ baseUrl: this.grpcUrl, ...options });
      this.#clients.push(client);
      return client;
    }
    return createClient({ baseUrl: this.httpUrl, ...options });
  }

  /** The server's log so far (for failure messages). */
  log(): string {
    try {
      return readFileSync(this.logPath, "utf8");
    } catch {
      return "";
    }
  }

  /** Stops the server, closes the clients made by `client()` and removes the folder. */
  async close(): Promise<void> {
    for (const client of this.#clients) {
      client.close?.();
    }
    await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Polls `check` until it returns something other than `undefined`, or fails after `timeoutMs`. */
export async function eventually<T>(
  check: () => Promise<T | undefined>,
  timeoutMs = 10_000,
  what = "condition",
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value !== undefined) {
      return value;
    }
    if (Date.now() > deadline) {
      throw new Error(`${what} not reached within ${timeoutMs} ms`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** A port nothing listens on: one the OS gave and took back. */
export async function closedPort(): Promise<number> {
  const net = await import("node:net");
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address !== null ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}

/** A unique id for an instance of one test. */
/** Each event as a short line: "3 stepSucceeded one#1", "8 status complete". */
export function summary(events: readonly WatchEvent[]): string[] {
  return events.map((e) => {
    switch (e.kind) {
      case "statusChanged":
        return `${e.sequence} status ${e.status}`;
      case "stepStarted":
      case "stepSucceeded":
      case "stepFailed":
      case "attemptFailed":
        return `${e.sequence} ${e.kind} ${e.step.name}#${e.attempt}`;
      default:
        return `${e.sequence} ${e.kind}`;
    }
  });
}

export function uniqueId(prefix: string): string {
  return `${prefix}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
}
