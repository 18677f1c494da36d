/**
 * watch() follows an instance across a server killed with SIGKILL and
 * started again on the same store and ports: no event lost, none repeated.
 */

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { Code, CruzflowError, type WatchEvent } from "../src/index.js";
import { Server, TRANSPORTS, summary, uniqueId } from "./harness.js";

for (const transport of TRANSPORTS) {
  describe(`watch and restarts over ${transport}`, () => {
    let server: Server;

    before(async () => {
      server = await new Server().start();
    });

    after(async () => {
      await server.close();
    });

    test("resumes across a SIGKILL and restart without losing or repeating events", async () => {
      const client = server.client(transport, { reconnect: { initialBackoffMs: 50, maxBackoffMs: 200 } });
      const instance = await client.workflow("steps5").create({ ms: 300 }, { id: uniqueId("watch") });
      const seen: WatchEvent[] = [];
      let killed = false;
      let restarted: Promise<unknown> | undefined;
      for await (const event of instance.watch({ timeoutMs: 30_000 })) {
        seen.push(event);
        // Kill once the second step has succeeded: the third is mid-flight.
        if (!killed && event.kind === "stepSucceeded" && event.step.name === "s1") {
          killed = true;
          await server.kill();
          // Down long enough for the watch to fail and retry at least once.
          restarted = new Promise((r) => setTimeout(r, 600)).then(() => server.start());
          restarted.catch(() => {}); // awaited after the loop
        }
      }
      await restarted;
      assert.ok(killed, "the server was killed mid-watch");
      const sequences = seen.map((e) => e.sequence);
      assert.deepEqual(
        sequences,
        sequences.map((_, i) => i + 1),
        `sequences consecutive from 1: ${summary(seen).join(", ")}`,
      );
      const last = seen.at(-1);
      assert.equal(last?.kind, "statusChanged");
      assert.ok(last?.kind === "statusChanged" && last.status === "complete" && last.isFinal);
      assert.deepEqual(last.output, [0, 1, 2, 3, 4]);
      // The log as the server keeps it, read afresh, is what the watch saw.
      const replay: WatchEvent[] = [];
      for await (const event of instance.watch()) {
        replay.push(event);
      }
      assert.deepEqual(summary(replay), summary(seen));
      // The step cut by the kill ran a second attempt after the restart.
      const s2Starts = seen.filter((e) => e.kind === "stepStarted" && e.step.name === "s2");
      assert.ok(s2Starts.length >= 1);
      const info = await instance.status();
      assert.equal(info.lastSequence, last.sequence);
    });

    test("result() follows the instance across a SIGKILL and restart", async () => {
      const client = server.client(transport, { reconnect: { initialBackoffMs: 50, maxBackoffMs: 200 } });
      const instance = await client.workflow("steps5").create({ ms: 200 }, { id: uniqueId("res") });
      const result = instance.result({ timeoutMs: 30_000 });
      result.catch(() => {}); // awaited below: not an unhandled rejection meanwhile
      await server.kill();
      await new Promise((r) => setTimeout(r, 400));
      await server.start();
      assert.deepEqual(await result, [0, 1, 2, 3, 4]);
    });

    test("a create with an id is retried until the server is back; one without is not", async () => {
      const client = server.client(transport, { retry: { maxAttempts: 20, initialBackoffMs: 50, maxBackoffMs: 200 } });
      await server.kill();
      const withoutId = client.workflow("three-steps").create({ n: 0 });
      const id = uniqueId("back");
      const withId = client.workflow("three-steps").create({ n: 1 }, { id });
      withId.catch(() => {}); // awaited below: not an unhandled rejection meanwhile
      await assert.rejects(withoutId, (error: unknown) => error instanceof CruzflowError && error.code === Code.Unavailable);
      await new Promise((r) => setTimeout(r, 300));
      await server.start();
      const instance = await withId;
      assert.equal(instance.id, id);
      assert.deepEqual(await instance.result({ timeoutMs: 10_000 }), { sum: 6, params: { n: 1 } });
    });

    test("afterSequence resumes mid-log and a break closes the stream", async () => {
      const client = server.client(transport);
      const instance = await client.workflow("three-steps").create({ a: 1 }, { id: uniqueId("after") });
      await instance.result({ timeoutMs: 10_000 });
      const all: WatchEvent[] = [];
      for await (const event of instance.watch()) {
        all.push(event);
      }
      assert.ok(all.length >= 8, `a full log: ${summary(all).join(", ")}`);
      const tail: WatchEvent[] = [];
      for await (const event of instance.watch({ afterSequence: 3 })) {
        tail.push(event);
      }
      assert.deepEqual(summary(tail), summary(all.slice(3)));
      let count = 0;
      for await (const _ of instance.watch()) {
        if (++count === 2) {
          break;
        }
      }
      assert.equal(count, 2);
    });

    test("a watch gives up with Unavailable once reconnect is exhausted", async () => {
      const down = await new Server().start();
      const client = down.client(transport, {
        reconnect: { maxAttempts: 3, initialBackoffMs: 20, maxBackoffMs: 40 },
      });
      const instance = await client.workflow("approval").create(null, { id: uniqueId("gone") });
      await down.kill();
      const started = Date.now();
      await assert.rejects(
        async () => {
          for await (const _ of instance.watch()) {
            // the events before the kill, if any
          }
        },
        (error: unknown) => error instanceof CruzflowError && error.code === Code.Unavailable,
      );
      assert.ok(Date.now() - started < 5_000);
      await down.close();
    });
  });
}
