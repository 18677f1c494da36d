/**
 * client.watchMany (WatchInstances) against real servers: every instance's
 * events once and in order, as its own watch() gives them; the checks made
 * before any call; timeouts, aborts and a break; and a reconnection across a
 * SIGKILL and restart with each instance's own cursor, leaving out those that
 * ended.
 */

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import type { Interceptor } from "@connectrpc/connect";
import {
  Code,
  CruzflowError,
  DeadlineExceeded,
  InstanceNotFound,
  InvalidArgument,
  MAX_WATCHED,
  ResourceExhausted,
  type Client,
  type InstanceHandle,
  type WatchEvent,
} from "../src/index.js";
import type { WatchInstancesRequest } from "../src/gen/cruzflow/v1/workflows_pb.js";
import { Server, TRANSPORTS, eventually, summary, uniqueId } from "./harness.js";

/** The events by instance, in the order they came. */
function byInstance(events: readonly WatchEvent[]): Map<string, WatchEvent[]> {
  const out = new Map<string, WatchEvent[]>();
  for (const event of events) {
    const list = out.get(event.instanceId) ?? [];
    list.push(event);
    out.set(event.instanceId, list);
  }
  return out;
}

async function collect<T>(events: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const event of events) {
    out.push(event);
  }
  return out;
}

/** Asserts each instance's events are its whole log, once, in order, as watch() reads it. */
async function assertWholeLogs(client: Client, ids: readonly string[], seen: readonly WatchEvent[]): Promise<void> {
  const groups = byInstance(seen);
  assert.deepEqual([...groups.keys()].sort(), [...ids].sort(), "events of exactly the instances watched");
  for (const id of ids) {
    const events = groups.get(id) ?? [];
    const sequences = events.map((e) => e.sequence);
    assert.deepEqual(
      sequences,
      sequences.map((_, i) => i + 1),
      `${id}: sequences 1..N, each once: ${summary(events).join(", ")}`,
    );
    const last = events.at(-1);
    assert.ok(last?.kind === "statusChanged" && last.isFinal, `${id} ends with its final event`);
    assert.equal((await client.instance(id).status()).lastSequence, last.sequence);
    assert.deepEqual(summary(events), summary(await collect(client.instance(id).watch())), `${id}: as watch() reads it`);
  }
}

for (const transport of TRANSPORTS) {
  describe(`watchMany over ${transport}`, () => {
    let server: Server;
    let client: Client;

    before(async () => {
      server = await new Server().start();
      client = server.client(transport);
    });

    after(async () => {
      await server.close();
    });

    test("every instance's events once, in order, as watch() gives them; the stream ends with the last", async () => {
      const key = uniqueId("many");
      const handles = [
        // Two that run through the watch, side by side.
        await client.workflow("steps5").create({ ms: 100 }, { id: `${key}-a` }),
        await client.workflow("steps5").create({ ms: 100 }, { id: `${key}-b` }),
        await client.workflow("three-steps").create({ n: 1 }, { id: `${key}-c` }),
        await client.workflow("raises").create(null, { id: `${key}-d` }),
      ];
      const seen = await collect(client.watchMany(handles.map((h) => h.id), { timeoutMs: 30_000 }));
      await assertWholeLogs(client, handles.map((h) => h.id), seen);
      const finals = new Map(
        seen.flatMap((e) => (e.kind === "statusChanged" && e.isFinal ? [[e.instanceId, e] as const] : [])),
      );
      assert.deepEqual(finals.get(`${key}-a`)?.output, [0, 1, 2, 3, 4]);
      assert.deepEqual(finals.get(`${key}-c`)?.output, { sum: 6, params: { n: 1 } });
      assert.equal(finals.get(`${key}-d`)?.status, "errored");
      assert.equal(finals.get(`${key}-d`)?.error?.name, "ValueError");
      // Several instances ran at once: their events interleave in the stream.
      const order = seen.map((e) => e.instanceId);
      const switches = order.filter((id, i) => i > 0 && id !== order[i - 1]).length;
      assert.ok(switches > handles.length - 1, `interleaved: ${order.join(" ")}`);
    });

    test("ids, handles, { id, afterSequence } cursors and a Map: each from its own cursor", async () => {
      const key = uniqueId("cur");
      const [a, b, c] = await client.workflow("three-steps").createMany([
        { id: `${key}-a`, params: 1 },
        { id: `${key}-b`, params: 2 },
        { id: `${key}-c`, params: 3 },
      ]);
      const handles = [a, b, c] as InstanceHandle[];
      await Promise.all(handles.map((h) => h.wait({ timeoutMs: 10_000 })));
      const logs = new Map<string, string[]>();
      for (const h of handles) {
        logs.set(h.id, summary(await collect(h.watch())));
      }
      const fromCursors = byInstance(
        await collect(client.watchMany([`${key}-a`, handles[1] as InstanceHandle, { id: `${key}-c`, afterSequence: 5 }])),
      );
      assert.deepEqual(summary(fromCursors.get(`${key}-a`) ?? []), logs.get(`${key}-a`));
      assert.deepEqual(summary(fromCursors.get(`${key}-b`) ?? []), logs.get(`${key}-b`));
      assert.deepEqual(summary(fromCursors.get(`${key}-c`) ?? []), logs.get(`${key}-c`)?.slice(5));
      const fromMap = byInstance(
        await collect(client.watchMany(new Map([[`${key}-a`, 7], [`${key}-b`, 0]]))),
      );
      assert.deepEqual(summary(fromMap.get(`${key}-a`) ?? []), logs.get(`${key}-a`)?.slice(7));
      assert.deepEqual(summary(fromMap.get(`${key}-b`) ?? []), logs.get(`${key}-b`));
    });

    test("bad input is refused at the call, before any request; the server's refusals come through", async () => {
      const refused = (call: () => unknown, pattern: RegExp): void =>
        assert.throws(call, (error: unknown) => {
          assert.ok(error instanceof InvalidArgument, String(error));
          assert.match(error.details, pattern);
          return true;
        });
      refused(() => client.watchMany([]), /at least one instance/);
      refused(() => client.watchMany(["x", "y", "x"]), /instances\[2\]: 'x' is listed already/);
      refused(() => client.watchMany(["x", { id: "x", afterSequence: 3 }]), /instances\[1\]: 'x' is listed already/);
      const many = Array.from({ length: MAX_WATCHED + 1 }, (_, i) => `i${i}`);
      refused(() => client.watchMany(many), /1001 listed, at most 1000/);
      refused(() => client.watchMany("solo" as unknown as string[]), /not one string.*\["solo"\]/);
      refused(() => client.watchMany([""]), /instances\[0\]\.id/);
      refused(() => client.watchMany([{ id: "x", afterSequence: -1 }]), /instances\[0\]\.afterSequence/);
      refused(() => client.watchMany([{ id: "x", afterSequence: 1.5 }]), /instances\[0\]\.afterSequence/);
      refused(() => client.watchMany([7 as unknown as string]), /instances\[0\]: expected an id/);
      refused(() => client.watchMany({ id: "x" } as unknown as string[]), /expected an array/);
      refused(() => client.watchMany(["x"], { timeoutMs: 0 }), /timeoutMs/);
      // Exactly the most is allowed by the client (the server says NotFound).
      await assert.rejects(collect(client.watchMany(many.slice(0, MAX_WATCHED))), InstanceNotFound);
      const done = await client.workflow("three-steps").create(null, { id: uniqueId("past") });
      await done.wait({ timeoutMs: 10_000 });
      await assert.rejects(collect(client.watchMany([done.id, "no-such-instance"])), (error: unknown) => {
        assert.ok(error instanceof InstanceNotFound);
        assert.match(error.details, /instances\[1\]/);
        return true;
      });
      await assert.rejects(collect(client.watchMany([{ id: done.id, afterSequence: 999 }])), (error: unknown) => {
        assert.ok(error instanceof InvalidArgument);
        assert.match(error.details, /past the newest event/);
        return true;
      });
    });

    test("timeoutMs: DeadlineExceeded; an aborted signal: Canceled", async () => {
      const waiting = await client.workflow("approval").create(null, { id: uniqueId("dl") });
      const done = await client.workflow("three-steps").create(null, { id: uniqueId("dl") });
      await done.wait({ timeoutMs: 10_000 });
      const seen: WatchEvent[] = [];
      const started = Date.now();
      await assert.rejects(
        async () => {
          for await (const event of client.watchMany([done.id, waiting.id], { timeoutMs: 500 })) {
            seen.push(event);
          }
        },
        (error: unknown) => {
          assert.ok(error instanceof DeadlineExceeded, String(error));
          assert.equal(error.code, Code.DeadlineExceeded);
          assert.match(error.details, /1 instances not ended yet/);
          return true;
        },
      );
      const took = Date.now() - started;
      assert.ok(took >= 450 && took < 5_000, `took ${took} ms`);
      // What came before the timeout: all of the ended one, the start of the other.
      assert.ok(seen.some((e) => e.instanceId === done.id && e.kind === "statusChanged" && e.isFinal));
      assert.ok(seen.some((e) => e.instanceId === waiting.id));
      const controller = new AbortController();
      setTimeout(() => controller.abort(), 300);
      await assert.rejects(collect(client.watchMany([waiting.id], { signal: controller.signal })), (error: unknown) => {
        assert.ok(error instanceof CruzflowError);
        assert.equal(error.code, Code.Canceled);
        return true;
      });
      await waiting.terminate();
    });
  });

  describe(`watchMany's stream over ${transport}, on a server of 2 watchers`, () => {
    let server: Server;

    before(async () => {
      server = await new Server({ limits: { max_watchers: 2 } }).start();
    });

    after(async () => {
      await server.close();
    });

    test("a break closes the stream: its instances stop counting as watchers", async () => {
      const client = server.client(transport, { reconnect: null });
      const key = uniqueId("brk");
      const a = await client.workflow("approval").create(null, { id: `${key}-a` });
      const b = await client.workflow("approval").create(null, { id: `${key}-b` });
      const first = client.watchMany([a.id, b.id]);
      assert.equal((await first.next()).done, false);
      // Both watchers are taken while it is open.
      await assert.rejects(collect(client.watchMany([a.id])), ResourceExhausted);
      await first.return(); // what a `break` does
      const again = await eventually(async () => {
        try {
          const events: WatchEvent[] = [];
          for await (const event of client.watchMany([a.id, b.id])) {
            events.push(event);
            if (events.length === 2) {
              break;
            }
          }
          return events;
        } catch (error) {
          if (error instanceof ResourceExhausted) {
            return undefined; // the server has not seen the close yet
          }
          throw error;
        }
      }, 5_000, "both watchers free again");
      assert.equal(again.length, 2);
      await a.terminate();
      await b.terminate();
    });
  });

  describe(`watchMany and restarts over ${transport}`, () => {
    let server: Server;

    before(async () => {
      server = await new Server().start();
    });

    after(async () => {
      await server.close();
    });

    test("resumes across a SIGKILL and restart from each instance's cursor, without the ended ones", async () => {
      const seen: WatchEvent[] = [];
      // Each WatchInstances request, and what the watch had yielded when it was sent.
      const requests: { cursors: string[]; yielded: Map<string, WatchEvent> }[] = [];
      const spy: Interceptor = (next) => async (req) => {
        if (!req.stream || req.method.name !== "WatchInstances") {
          return next(req);
        }
        const messages = [];
        for await (const message of req.message) {
          messages.push(message);
        }
        const yielded = new Map(seen.map((e) => [e.instanceId, e]));
        const cursors = messages.flatMap((m) =>
          (m as unknown as WatchInstancesRequest).instances.map(
            (c) => `${c.instanceId}@${c.afterSequence}`,
          ),
        );
        requests.push({ cursors, yielded });
        return next({ ...req, message: (async function* () { yield* messages; })() });
      };
      const client = server.client(transport, {
        reconnect: { initialBackoffMs: 50, maxBackoffMs: 200 },
        interceptors: [spy],
      });
      const key = uniqueId("mkill");
      const ended = await client.workflow("three-steps").create({ n: 0 }, { id: `${key}-ended` });
      await ended.wait({ timeoutMs: 10_000 });
      const early = await client.workflow("steps5").create({ ms: 10 }, { id: `${key}-early` });
      const slow = [
        await client.workflow("steps5").create({ ms: 300 }, { id: `${key}-slow1` }),
        await client.workflow("steps5").create({ ms: 300 }, { id: `${key}-slow2` }),
      ];
      const ids = [ended.id, early.id, ...slow.map((h) => h.id)];
      let killed = false;
      let restarted: Promise<unknown> | undefined;
      for await (const event of client.watchMany(ids, { timeoutMs: 30_000 })) {
        seen.push(event);
        const finished = (id: string): boolean =>
          seen.some((e) => e.instanceId === id && e.kind === "statusChanged" && e.isFinal);
        const slowS1 = seen.some(
          (e) => e.instanceId === slow[0]?.id && e.kind === "stepSucceeded" && e.step.name === "s1",
        );
        if (!killed && finished(ended.id) && finished(early.id) && slowS1) {
          killed = true;
          await server.kill();
          // Down long enough for the watch to fail and retry at least once.
          restarted = new Promise((r) => setTimeout(r, 600)).then(() => server.start());
          restarted.catch(() => {}); // awaited after the loop
        }
      }
      await restarted;
      assert.ok(killed, "the server was killed mid-watch");
      await assertWholeLogs(client, ids, seen);
      for (const h of slow) {
        const last = seen.filter((e) => e.instanceId === h.id).at(-1);
        assert.ok(last?.kind === "statusChanged" && last.status === "complete");
        assert.deepEqual(last.output, [0, 1, 2, 3, 4]);
      }
      // The first request asked for every instance from the start; each
      // reconnection for those not ended, after the last sequence yielded.
      assert.deepEqual(requests[0]?.cursors, ids.map((id) => `${id}@0`));
      assert.ok(requests.length >= 3, `reconnected after failing at least once: ${requests.length} requests`);
      for (const { cursors, yielded } of requests.slice(1)) {
        const expected = ids.flatMap((id) => {
          const last = yielded.get(id);
          return last?.kind === "statusChanged" && last.isFinal ? [] : [`${id}@${last?.sequence ?? 0}`];
        });
        assert.deepEqual(cursors, expected);
        assert.ok(!cursors.some((c) => c.startsWith(`${ended.id}@`) || c.startsWith(`${early.id}@`)));
        assert.ok(cursors.every((c) => !c.endsWith("@0")), `resumed mid-log: ${cursors.join(" ")}`);
      }
    });

    test("gives up with Unavailable once reconnect is exhausted", async () => {
      const down = await new Server().start();
      const client = down.client(transport, { reconnect: { maxAttempts: 3, initialBackoffMs: 20, maxBackoffMs: 40 } });
      const a = await client.workflow("approval").create(null, { id: uniqueId("gone") });
      await down.kill();
      const started = Date.now();
      await assert.rejects(collect(client.watchMany([a.id])), (error: unknown) => {
        assert.ok(error instanceof CruzflowError);
        assert.equal(error.code, Code.Unavailable);
        return true;
      });
      assert.ok(Date.now() - started < 5_000);
      await down.close();
    });
  });
}
