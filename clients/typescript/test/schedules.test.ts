/**
 * The schedule methods against a real server, over each transport: create,
 * get, list, pause, resume, trigger and delete, the schedule filter of
 * listings, and a bad cron expression's error.
 */

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { Code, CruzflowError, type Client } from "../src/index.js";
import { Server, TRANSPORTS, eventually, uniqueId } from "./harness.js";

let server: Server;

before(async () => {
  server = await new Server().start();
});

after(async () => {
  await server.close();
});

for (const transport of TRANSPORTS) {
  describe(`schedules over ${transport}`, () => {
    let client: Client;

    before(() => {
      client = server.client(transport);
    });

    test("a schedule fires by its cron, is paused, triggered, resumed and deleted", async () => {
      const id = uniqueId("tick");
      const made = await client.createSchedule(id, "three-steps", "* * * * * *", {
        params: { from: "cron" },
        timezone: "Europe/Paris",
        catchUp: "skip",
      });
      assert.equal(made.id, id);
      assert.equal(made.catchUp, "skip");
      assert.equal(made.origin, "api");
      assert.equal(made.timezone, "Europe/Paris");
      assert.deepEqual(made.params, { from: "cron" });
      assert.ok(made.nextDueTime instanceof Date);
      assert.ok((await client.listSchedules()).some((s) => s.id === id));

      const fired = await eventually(async () => {
        const page = await client.listInstancesPage({ scheduleId: id });
        return page.instances.length > 0 ? page.instances : undefined;
      });
      assert.ok(fired[0]!.id.startsWith(`sched-${id}-`));
      assert.equal(fired[0]!.scheduleId, id);

      const paused = await client.pauseSchedule(id);
      assert.equal(paused.paused, true);
      assert.equal(paused.nextDueTime, undefined);
      const triggered = await client.triggerSchedule(id);
      assert.ok(triggered.id.startsWith(`sched-${id}-now-`));
      const info = await triggered.wait({ timeoutMs: 10_000 });
      assert.equal(info.status, "complete");
      assert.equal(info.scheduleId, id);
      assert.equal((await client.resumeSchedule(id)).paused, false);
      assert.equal((await client.getSchedule(id)).paused, false);

      await client.deleteSchedule(id);
      await assert.rejects(client.getSchedule(id), (error: unknown) => {
        return error instanceof CruzflowError && error.code === Code.NotFound;
      });
    });

    test("a bad cron expression is refused with INVALID_ARGUMENT naming the field", async () => {
      await assert.rejects(client.createSchedule(uniqueId("bad"), "three-steps", "every monday"), (error: unknown) => {
        return error instanceof CruzflowError && error.code === Code.InvalidArgument && /cron:/.test(error.message);
      });
    });
  });
}
