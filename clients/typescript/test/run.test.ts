/**
 * WorkflowBinding.run and runInfo (RunInstance) against real servers: the
 * output, the outcomes and the timeout as result() gives them, the refusals
 * of create(), and the retries of create(): only with an id, and an
 * AlreadyExists of our own earlier attempt waits for it (a lost answer made
 * by an interceptor, and a real SIGKILL and restart mid-wait).
 */

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { Code as ConnectCode, ConnectError, type Interceptor } from "@connectrpc/connect";
import {
  Code,
  CruzflowError,
  InstanceAlreadyExists,
  InvalidArgument,
  ResultTimeout,
  WorkflowFailed,
  WorkflowNotFound,
  WorkflowTerminated,
  type Client,
} from "../src/index.js";
import { Server, TRANSPORTS, eventually, uniqueId } from "./harness.js";

/**
 * An interceptor that loses the first RunInstance answer: it sends the call
 * (`"after"`, so the server creates the instance) or not (`"before"`), then
 * fails it as a cut connection would.
 */
function losesFirstAnswer(when: "before" | "after"): { interceptor: Interceptor; calls: () => number } {
  let calls = 0;
  const interceptor: Interceptor = (next) => async (req) => {
    if (req.method.name !== "RunInstance") {
      return next(req);
    }
    calls += 1;
    if (calls === 1) {
      if (when === "after") {
        await next(req);
      }
      throw new ConnectError("the answer was lost", ConnectCode.Unavailable);
    }
    return next(req);
  };
  return { interceptor, calls: () => calls };
}

for (const transport of TRANSPORTS) {
  describe(`run over ${transport}`, () => {
    let server: Server;
    let client: Client;

    before(async () => {
      server = await new Server().start();
      client = server.client(transport);
    });

    after(async () => {
      await server.close();
    });

    test("run: the workflow's output, and the instance stored with the options given", async () => {
      const id = uniqueId("run");
      const output = await client.workflow("three-steps").run({ n: 1 }, { id, lookupKey: id, priority: 3 });
      assert.deepEqual(output, { sum: 6, params: { n: 1 } });
      const info = await client.instance(id).status();
      assert.equal(info.status, "complete");
      assert.deepEqual(info.output, output);
      assert.equal(info.lookupKey, id);
      assert.equal(info.priority, 3);
      assert.deepEqual(await client.instance(id).result(), output);
      // Without an id the server names it; runInfo gives the final status.
      const ran = await client.workflow("steps5").runInfo({ ms: 10 }, { timeoutMs: 10_000 });
      assert.match(ran.id, /^[0-9a-f]{32}$/);
      assert.equal(ran.status, "complete");
      assert.equal(ran.workflow, "steps5");
      assert.deepEqual(ran.output, [0, 1, 2, 3, 4]);
      assert.deepEqual(ran.params, { ms: 10 });
      assert.deepEqual(await client.instance(ran.id).result(), [0, 1, 2, 3, 4]);
    });

    test("an errored instance: the WorkflowFailed result() throws; runInfo resolves to it", async () => {
      const id = uniqueId("runerr");
      const error = await client.workflow("raises").run(null, { id }).then(
        () => assert.fail("run() resolved"),
        (e: unknown) => e,
      );
      assert.ok(error instanceof WorkflowFailed);
      assert.equal(error.instanceId, id);
      assert.equal(error.errorName, "ValueError");
      assert.equal(error.errorMessage, "bad input row 7");
      assert.match(error.errorTraceback ?? "", /ValueError: bad input row 7/);
      await assert.rejects(client.instance(id).result(), (other: unknown) => {
        assert.ok(other instanceof WorkflowFailed);
        assert.deepEqual(
          [other.message, other.errorName, other.errorMessage, other.errorTraceback],
          [error.message, error.errorName, error.errorMessage, error.errorTraceback],
        );
        return true;
      });
      const info = await client.workflow("raises").runInfo(null);
      assert.equal(info.status, "errored");
      assert.equal(info.error?.name, "ValueError");
    });

    test("a terminated instance: WorkflowTerminated", async () => {
      const id = uniqueId("runterm");
      const running = client.workflow("approval").run(null, { id, timeoutMs: 20_000 }).then(
        () => assert.fail("run() resolved"),
        (e: unknown) => e,
      );
      await eventually(async () => {
        try {
          return (await client.instance(id).status()).status === "waiting" ? true : undefined;
        } catch {
          return undefined; // not created yet
        }
      });
      await client.instance(id).terminate();
      const error = await running;
      assert.ok(error instanceof WorkflowTerminated);
      assert.equal(error.instanceId, id);
    });

    test("timeoutMs passes first: ResultTimeout naming the instance, which goes on", async () => {
      const id = uniqueId("runslow");
      const started = Date.now();
      await assert.rejects(client.workflow("approval").run(null, { id, timeoutMs: 400 }), (error: unknown) => {
        assert.ok(error instanceof ResultTimeout);
        assert.equal(error.instanceId, id);
        assert.equal(error.timeoutMs, 400);
        assert.equal(error.status, "waiting");
        assert.match(error.message, new RegExp(`'${id}'`));
        return true;
      });
      const took = Date.now() - started;
      assert.ok(took >= 350 && took < 5_000, `took ${took} ms`);
      // Without an id, the error names the server's; follow it from there.
      const error = await client.workflow("approval").runInfo(null, { timeoutMs: 0 }).then(
        () => assert.fail("runInfo() resolved"),
        (e: unknown) => e,
      );
      assert.ok(error instanceof ResultTimeout && error.instanceId !== undefined);
      assert.equal(error.timeoutMs, 0);
      const instance = client.instance(error.instanceId);
      await instance.sendEvent("approval", "ok");
      assert.deepEqual(await instance.result({ timeoutMs: 10_000 }), { approved: "ok", type: "approval" });
      await client.instance(id).terminate();
    });

    test("refused as create() is: an unknown workflow, a taken id, bad options", async () => {
      await assert.rejects(client.workflow("no-such-workflow").run({}), (error: unknown) => {
        assert.ok(error instanceof WorkflowNotFound);
        assert.equal(error.code, Code.NotFound);
        assert.match(error.details, /'no-such-workflow' is not registered/);
        return true;
      });
      const id = uniqueId("taken");
      await client.workflow("three-steps").create({ n: 1 }, { id });
      // Not retried, so not ours: even with the same params.
      await assert.rejects(client.workflow("three-steps").run({ n: 1 }, { id }), InstanceAlreadyExists);
      await assert.rejects(client.workflow("three-steps").run(null, { id: "bad id!" }), InvalidArgument);
      await assert.rejects(client.workflow("three-steps").run(null, { id: "" }), InvalidArgument);
      await assert.rejects(client.workflow("three-steps").run(null, { timeoutMs: -1 }), InvalidArgument);
      await assert.rejects(client.workflow("three-steps").run(10n), InvalidArgument); // not JSON
    });

    test("an aborted signal: Canceled", async () => {
      const controller = new AbortController();
      setTimeout(() => controller.abort(), 300);
      const id = uniqueId("runabort");
      await assert.rejects(client.workflow("approval").run(null, { id, signal: controller.signal }), (error: unknown) => {
        assert.ok(error instanceof CruzflowError);
        assert.equal(error.code, Code.Canceled);
        return true;
      });
      await client.instance(id).terminate();
    });

    test("a lost answer with an id: retried, and the instance our first attempt stored is waited for", async () => {
      const lost = losesFirstAnswer("after");
      const retrying = server.client(transport, { retry: { initialBackoffMs: 10 }, interceptors: [lost.interceptor] });
      const id = uniqueId("lost");
      const output = await retrying.workflow("three-steps").run({ n: 2 }, { id, lookupKey: "k" });
      assert.deepEqual(output, { sum: 6, params: { n: 2 } });
      assert.equal(lost.calls(), 2);
    });

    test("a retry that finds another's instance under the id: InstanceAlreadyExists", async () => {
      const id = uniqueId("other");
      await client.workflow("three-steps").create({ n: 1 }, { id });
      for (const [params, lookupKey] of [[{ n: 2 }, undefined], [{ n: 1 }, "another-key"]] as const) {
        const lost = losesFirstAnswer("before");
        const retrying = server.client(transport, { retry: { initialBackoffMs: 10 }, interceptors: [lost.interceptor] });
        await assert.rejects(retrying.workflow("three-steps").run(params, { id, lookupKey }), InstanceAlreadyExists);
        assert.equal(lost.calls(), 2);
      }
      // Of another workflow, with the same params: not ours either.
      const lost = losesFirstAnswer("before");
      const retrying = server.client(transport, { retry: { initialBackoffMs: 10 }, interceptors: [lost.interceptor] });
      await assert.rejects(retrying.workflow("steps5").run({ n: 1 }, { id }), InstanceAlreadyExists);
    });

    test("a lost answer without an id: Unavailable, never retried", async () => {
      const lost = losesFirstAnswer("after");
      const retrying = server.client(transport, { retry: { initialBackoffMs: 10 }, interceptors: [lost.interceptor] });
      await assert.rejects(retrying.workflow("three-steps").run({ n: 3 }), (error: unknown) => {
        assert.ok(error instanceof CruzflowError);
        assert.equal(error.code, Code.Unavailable);
        return true;
      });
      assert.equal(lost.calls(), 1);
    });
  });

  describe(`run and restarts over ${transport}`, () => {
    let server: Server;

    before(async () => {
      server = await new Server().start();
    });

    after(async () => {
      await server.close();
    });

    test("with an id, run outlives a SIGKILL and restart mid-wait", async () => {
      const client = server.client(transport, {
        retry: { maxAttempts: 30, initialBackoffMs: 50, maxBackoffMs: 200 },
        reconnect: { initialBackoffMs: 50, maxBackoffMs: 200 },
      });
      const id = uniqueId("runkill");
      const running = client.workflow("steps5").run({ ms: 200 }, { id, timeoutMs: 30_000 });
      running.catch(() => {}); // awaited below: not an unhandled rejection meanwhile
      // Stored, and mid-run: its second step has begun.
      await eventually(async () => {
        try {
          const info = await client.instance(id).status();
          return info.steps.length >= 2 ? true : undefined;
        } catch {
          return undefined;
        }
      });
      await server.kill();
      await new Promise((r) => setTimeout(r, 400));
      await server.start();
      assert.deepEqual(await running, [0, 1, 2, 3, 4]);
      const info = await client.instance(id).status();
      assert.equal(info.status, "complete");
      assert.deepEqual(info.params, { ms: 200 });
    });
  });
}
