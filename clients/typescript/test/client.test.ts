/**
 * The typed client against a real server, over each transport: create,
 * status, wait and result in every outcome, listings, the controls, events.
 */

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  Code,
  ResultTimeout,
  WorkflowFailed,
  WorkflowTerminated,
  type Client,
  type InstanceInfo,
} from "../src/index.js";
import { Server, eventually, TRANSPORTS, uniqueId } from "./harness.js";

interface Onboarding {
  userId: string;
  email: string;
  plan: string;
}

interface OnboardingOutput {
  success: boolean;
  userId: string;
  projectId: string;
}

let server: Server;

before(async () => {
  server = await new Server().start();
});

after(async () => {
  await server.close();
});

for (const transport of TRANSPORTS) {
  describe(`client over ${transport}`, () => {
    let client: Client;

    before(() => {
      client = server.client(transport);
    });

    test("listWorkflows names the hosted workflows", async () => {
      const workflows = await client.listWorkflows();
      const onboarding = workflows.find((w) => w.name === "onboarding-workflow");
      assert.deepEqual(onboarding, {
        name: "onboarding-workflow",
        binding: "ONBOARDING_WORKFLOW",
        className: "onboarding.workflow:OnboardingWorkflow",
      });
      assert.equal(workflows.length, 8);
    });

    test("create with an id and lookup key, then status and result", async () => {
      const onboarding = client.workflow<Onboarding, OnboardingOutput>("onboarding-workflow");
      const id = uniqueId("onb");
      const userId = id.slice(4);
      const params = { userId, email: "ada@example.com", plan: "pro" };
      const instance = await onboarding.create(params, { id, lookupKey: `user:${userId}` });
      assert.equal(instance.id, id);
      const output = await instance.result({ timeoutMs: 10_000 });
      assert.equal(output.success, true);
      assert.equal(output.userId, userId);
      assert.match(output.projectId, /^[0-9a-f-]{36}$/);
      const info = await instance.status();
      assert.equal(info.status, "complete");
      assert.equal(info.workflow, "onboarding-workflow");
      assert.deepEqual(info.params, params);
      assert.deepEqual(info.output, output);
      assert.equal(info.lookupKey, `user:${userId}`);
      assert.equal(info.error, undefined);
      assert.ok(info.createTime instanceof Date && info.endTime instanceof Date);
      assert.ok(info.endTime.getTime() >= info.createTime.getTime());
      assert.deepEqual(
        info.steps.map((s) => [s.name, s.status, s.kind, s.attempts]),
        [
          ["create-default-resources", "succeeded", "do", 1],
          ["send-welcome-email", "succeeded", "do", 1],
          ["setup-billing", "succeeded", "do", 1],
          ["mark-complete", "succeeded", "do", 1],
        ],
      );
      assert.deepEqual(info.steps[2]?.output, { plan: "pro" });
      assert.ok(info.lastSequence > 8);
      // Sizes of the stored JSON (UTF-8 bytes), against the default limit of 1 MiB.
      const bytes = (value: unknown): number => Buffer.byteLength(JSON.stringify(value));
      assert.equal(info.steps[2]?.outputBytes, bytes({ plan: "pro" }));
      const results = info.steps.map((s) => s.outputBytes);
      assert.deepEqual(info.payloads, {
        paramsBytes: bytes(params),
        outputBytes: bytes(output),
        largestStepBytes: Math.max(...results),
        totalBytes: bytes(params) + bytes(output) + results.reduce((a, b) => a + b, 0),
        limitBytes: 1024 * 1024,
      });
      // get() finds it by id, for its own workflow only.
      assert.equal((await onboarding.get(id)).id, id);
    });

    test("create without an id gets one from the server; params of any JSON shape round-trip", async () => {
      const instance = await client.workflow("three-steps").create({ n: 1.5, list: [null, "é", { deep: true }] });
      assert.match(instance.id, /^[0-9a-f]{32}$/);
      const output = await instance.result({ timeoutMs: 10_000 });
      assert.deepEqual(output, { sum: 6, params: { n: 1.5, list: [null, "é", { deep: true }] } });
      // No params at all reach run as null.
      const bare = await client.workflow("three-steps").create();
      assert.deepEqual(await bare.result({ timeoutMs: 10_000 }), { sum: 6, params: null });
    });

    test("ifExists: 'return' gives the existing instance", async () => {
      const id = uniqueId("idem");
      const first = await client.workflow("approval").create({ n: 1 }, { id });
      const again = await client.workflow("approval").create({ n: 2 }, { id, ifExists: "return" });
      assert.equal(again.id, first.id);
      assert.deepEqual((await again.status()).params, { n: 1 });
      await again.terminate();
    });

    test("wait and result of a failed instance: WorkflowFailed with the Python error", async () => {
      const instance = await client.workflow("raises").create(null, { id: uniqueId("fail") });
      const info = await instance.wait({ timeoutMs: 10_000 });
      assert.equal(info.status, "errored");
      assert.equal(info.error?.name, "ValueError");
      assert.equal(info.error?.message, "bad input row 7");
      await assert.rejects(instance.result(), (error: unknown) => {
        assert.ok(error instanceof WorkflowFailed);
        assert.equal(error.errorName, "ValueError");
        assert.equal(error.errorMessage, "bad input row 7");
        assert.match(error.errorTraceback ?? "", /ValueError: bad input row 7/);
        assert.equal(error.instanceId, instance.id);
        assert.equal(error.code, undefined);
        return true;
      });
      const steps = (await instance.status()).steps;
      assert.deepEqual(
        steps.map((s) => [s.name, s.status]),
        [
          ["fine", "succeeded"],
          ["boom", "failed"],
        ],
      );
      assert.equal(steps[1]?.error?.name, "ValueError");
    });

    test("wait and result of a terminated instance: WorkflowTerminated", async () => {
      const instance = await client.workflow("approval").create(null, { id: uniqueId("term") });
      // Settled into a value at once, so its rejection is never unhandled.
      const waiting = instance.result({ timeoutMs: 10_000 }).then(
        () => assert.fail("result() resolved"),
        (error: unknown) => error,
      );
      await eventually(async () => ((await instance.status()).status === "waiting" ? true : undefined));
      assert.equal(await instance.terminate(), "terminated");
      const error = await waiting;
      assert.ok(error instanceof WorkflowTerminated);
      assert.equal(error.instanceId, instance.id);
      assert.equal((await instance.wait()).status, "terminated");
    });

    test("result with a timeout: ResultTimeout with the status at that moment", async () => {
      const instance = await client.workflow("approval").create(null, { id: uniqueId("slow") });
      const started = Date.now();
      await assert.rejects(instance.result({ timeoutMs: 400 }), (error: unknown) => {
        assert.ok(error instanceof ResultTimeout);
        assert.equal(error.timeoutMs, 400);
        assert.equal(error.status, "waiting");
        assert.equal(error.instanceId, instance.id);
        return true;
      });
      const took = Date.now() - started;
      assert.ok(took >= 350 && took < 5_000, `took ${took} ms`);
      // The instance goes on: an event ends it.
      await instance.sendEvent("approval", { by: "grace" });
      assert.deepEqual(await instance.result({ timeoutMs: 10_000 }), {
        approved: { by: "grace" },
        type: "approval",
      });
    });

    test("pause, resume and restart", async () => {
      const instance = await client.workflow("naps").create({ ms: 60_000 }, { id: uniqueId("ctl") });
      await eventually(async () => ((await instance.status()).status === "waiting" ? true : undefined));
      const paused = await instance.pause();
      assert.ok(paused === "paused" || paused === "waitingForPause", paused);
      await eventually(async () => ((await instance.status()).status === "paused" ? true : undefined));
      const resumed = await instance.resume();
      assert.ok(resumed !== "paused", resumed);
      await instance.terminate();
      const restarted = await instance.restart();
      assert.ok(restarted === "running" || restarted === "queued", restarted);
      const info = await eventually(async () => {
        const current = await instance.status();
        return current.status === "waiting" ? current : undefined;
      });
      assert.deepEqual(
        info.steps.map((s) => [s.name, s.kind]),
        [
          ["before", "do"],
          ["nap", "sleep"],
        ],
      );
      assert.ok(info.wakeTime instanceof Date && info.wakeTime.getTime() > Date.now() + 30_000);
      await instance.terminate();
    });

    test("createMany creates all in one call, in order", async () => {
      const prefix = uniqueId("many");
      const handles = await client.workflow("three-steps").createMany([
        { id: `${prefix}-a`, params: { i: 0 } },
        { id: `${prefix}-b`, params: { i: 1 }, lookupKey: prefix },
        { params: { i: 2 } },
      ]);
      assert.deepEqual(handles.slice(0, 2).map((h) => h.id), [`${prefix}-a`, `${prefix}-b`]);
      const outputs = await Promise.all(handles.map((h) => h.result({ timeoutMs: 10_000 })));
      assert.deepEqual(
        outputs.map((o) => (o as { params: { i: number } }).params.i),
        [0, 1, 2],
      );
    });

    test("a parent's children are listed by parentId and linked both ways", async () => {
      const parent = await client.workflow("parent").create({ children: 2 }, { id: uniqueId("parent") });
      const done = await parent.wait({ timeoutMs: 10_000 });
      assert.equal(done.status, "complete");
      const kids: InstanceInfo[] = [];
      for await (const info of client.listInstances({ parentId: parent.id })) {
        kids.push(info);
      }
      assert.equal(kids.length, 2);
      assert.ok(kids.every((k) => k.parentId === parent.id && k.workflow === "kid"));
      const steps = (await parent.status()).steps.filter((s) => s.kind === "child");
      assert.deepEqual(steps.map((s) => s.childId).sort(), kids.map((k) => k.id).sort());
      assert.equal(done.parentId, undefined);
    });

    test("listInstances pages through the filters, newest first", async () => {
      const key = uniqueId("list");
      const created = [];
      for (let i = 0; i < 5; i++) {
        created.push(await client.workflow("three-steps").create({ i }, { id: `${key}-${i}`, lookupKey: key }));
      }
      await client.workflow("approval").create(null, { id: `${key}-other`, lookupKey: key });
      await Promise.all(created.map((h) => h.wait({ timeoutMs: 10_000 })));
      const page = await client.listInstancesPage({ lookupKey: key, workflow: "three-steps", pageSize: 2 });
      assert.equal(page.instances.length, 2);
      assert.ok(page.nextPageToken);
      const all: InstanceInfo[] = [];
      for await (const info of client.listInstances({ lookupKey: key, workflow: "three-steps", pageSize: 2 })) {
        all.push(info);
      }
      assert.deepEqual(
        all.map((i) => i.id),
        [4, 3, 2, 1, 0].map((i) => `${key}-${i}`),
      );
      assert.ok(all.every((i) => i.status === "complete" && i.steps.length === 0));
      const waiting = [];
      for await (const info of client.listInstances({ lookupKey: key, status: ["waiting", "queued", "running"] })) {
        waiting.push(info.id);
      }
      assert.deepEqual(waiting, [`${key}-other`]);
      const none = await client.listInstancesPage({ lookupKey: key, createTimeMin: new Date(Date.now() + 60_000) });
      assert.deepEqual(none.instances, []);
      assert.equal(none.nextPageToken, "");
      await client.instance(`${key}-other`).terminate();
    });

    test("countInstances counts per workflow and status, with the filters", async () => {
      const key = uniqueId("count");
      const done = await client.workflow("three-steps").createMany([
        { params: 1, lookupKey: key },
        { params: 2, lookupKey: key },
      ]);
      await Promise.all(done.map((h) => h.wait({ timeoutMs: 10_000 })));
      // Counted in a status that stays put.
      const ended = await client.workflow("approval").create(null, { lookupKey: key });
      await ended.terminate();
      const counted = await client.countInstances({ lookupKey: key });
      assert.deepEqual(counted, {
        counts: [
          { workflow: "approval", status: "terminated", count: 1 },
          { workflow: "three-steps", status: "complete", count: 2 },
        ],
        total: 3,
      });
      const mine = await client.countInstances({ lookupKey: key, workflow: "approval" });
      assert.deepEqual(mine.counts, [{ workflow: "approval", status: "terminated", count: 1 }]);
      const later = await client.countInstances({ lookupKey: key, createTimeMin: new Date(Date.now() + 60_000) });
      assert.deepEqual(later, { counts: [], total: 0 });
      // Without tracing on the server, an instance has no trace id.
      assert.equal((await ended.status()).traceId, undefined);
    });

    test("caller: without tokens, every call is allowed", async () => {
      assert.deepEqual(await client.caller(), {
        authRequired: false,
        tokenName: "",
        readOnly: false,
        workflows: [],
      });
    });

    test("sendEvent before the wait starts is kept for it", async () => {
      const id = uniqueId("early");
      const instance = await client.workflow("approval").create(null, { id });
      await instance.sendEvent("approval", [1, "two"]);
      assert.deepEqual(await instance.result({ timeoutMs: 10_000 }), { approved: [1, "two"], type: "approval" });
    });

    test("a call's own timeout: DeadlineExceeded", async () => {
      const instance = await client.workflow("approval").create(null, { id: uniqueId("dl") });
      await assert.rejects(
        async () => {
          for await (const _ of instance.watch({ timeoutMs: 300 })) {
            // request, then the wait: no final event within 300 ms
          }
        },
        (error: unknown) =>
          error instanceof Error && error.name === "DeadlineExceeded" && (error as { code?: Code }).code === Code.DeadlineExceeded,
      );
      await instance.terminate();
    });
  });
}
