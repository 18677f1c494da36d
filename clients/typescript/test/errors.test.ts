/**
 * Every error kind the client throws, from a real server over each
 * transport, and bearer-token authentication.
 */

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { after, before, describe, test } from "node:test";
import {
  Code,
  CruzflowError,
  FailedPrecondition,
  InstanceAlreadyExists,
  InstanceNotFound,
  InvalidArgument,
  NotFound,
  PermissionDenied,
  ResourceExhausted,
  Unauthenticated,
  Unavailable,
  WorkflowNotFound,
  createClient,
  fromConnectError,
  type Client,
} from "../src/index.js";
import { ConnectError } from "@connectrpc/connect";
import { createGrpcClient } from "../src/node.js";
import { Server, closedPort, eventually, TRANSPORTS, uniqueId, type TransportName } from "./harness.js";

/** An assertion for `assert.rejects`: the class, the code, and a message that says what is wrong. */
function refused(
  kind: abstract new (...args: never[]) => CruzflowError,
  code: Code | undefined,
  message: RegExp,
) {
  return (error: unknown): boolean => {
    assert.ok(error instanceof kind, `expected ${kind.name}, got ${String(error)}`);
    assert.ok(error instanceof CruzflowError);
    assert.equal(error.code, code);
    assert.match(error.details, message);
    assert.equal(error.message, error.details);
    return true;
  };
}

const secrets = {
  admin: `adm-${randomBytes(18).toString("base64url")}`,
  reader: `rd-${randomBytes(18).toString("base64url")}`,
  approver: `apv-${randomBytes(18).toString("base64url")}`,
};

let open: Server;
let guarded: Server;
let tight: Server;

before(async () => {
  [open, guarded, tight] = await Promise.all([
    new Server().start(),
    new Server({
      tokens: [
        { name: "admin", secret: secrets.admin, access: "write" },
        { name: "reader", secret: secrets.reader, access: "read" },
        { name: "approver", secret: secrets.approver, access: "write", workflows: ["approval"] },
      ],
    }).start(),
    new Server({ limits: { max_watchers: 1 } }).start(),
  ]);
});

after(async () => {
  await Promise.all([open.close(), guarded.close(), tight.close()]);
});

for (const transport of TRANSPORTS) {
  describe(`errors over ${transport}`, () => {
    let client: Client;

    before(() => {
      client = open.client(transport);
    });

    test("NotFound: an unknown instance, and an unknown workflow", async () => {
      await assert.rejects(
        client.instance("no-such-instance").status(),
        refused(InstanceNotFound, Code.NotFound, /^instance_id: .*no-such-instance/),
      );
      await assert.rejects(client.instance("no-such-instance").terminate(), InstanceNotFound);
      await assert.rejects(
        client.workflow("no-such-workflow").create({}),
        refused(WorkflowNotFound, Code.NotFound, /^workflow: .*no-such-workflow/),
      );
      const error = await client.instance("nope").status().catch((e: unknown) => e);
      assert.ok(error instanceof NotFound && error.instanceId === "nope" && error.codeName === "NOT_FOUND");
      // get() of another workflow's instance is not found for this one.
      const other = await client.workflow("three-steps").create(null, { id: uniqueId("nf") });
      await assert.rejects(client.workflow("approval").get(other.id), InstanceNotFound);
    });

    test("InstanceAlreadyExists: a taken id", async () => {
      const id = uniqueId("dup");
      await client.workflow("approval").create({ n: 1 }, { id });
      await assert.rejects(
        client.workflow("approval").create({ n: 1 }, { id }),
        refused(InstanceAlreadyExists, Code.AlreadyExists, new RegExp(id)),
      );
      await client.instance(id).terminate();
    });

    test("InvalidArgument: from the server, and from the client's own checks", async () => {
      await assert.rejects(
        client.workflow("three-steps").create(null, { id: "-starts-with-dash" }),
        refused(InvalidArgument, Code.InvalidArgument, /^instance_id: /),
      );
      await assert.rejects(
        client.workflow("three-steps").createMany([{ id: "ok-1" }, { id: "bad id" }]),
        refused(InvalidArgument, Code.InvalidArgument, /requests\[1\]\.instance_id/),
      );
      await assert.rejects(client.instance("x").sendEvent("t".repeat(101)), InvalidArgument);
      // Checked before any call: no code, a message naming the argument.
      const cyclic: Record<string, unknown> = {};
      cyclic["self"] = cyclic;
      await assert.rejects(
        client.workflow("three-steps").create(cyclic),
        refused(InvalidArgument, undefined, /^params: not JSON-serialisable/),
      );
      assert.throws(() => client.instance(""), InvalidArgument);
      await assert.rejects(client.listInstancesPage({ status: "bogus" as "queued" }), InvalidArgument);
    });

    test("FailedPrecondition: controls that do not fit the instance's state", async () => {
      const instance = await client.workflow("three-steps").create(null, { id: uniqueId("fp") });
      await instance.wait({ timeoutMs: 10_000 });
      await assert.rejects(instance.pause(), refused(FailedPrecondition, Code.FailedPrecondition, /.+/));
      await assert.rejects(instance.terminate(), FailedPrecondition);
      await assert.rejects(instance.sendEvent("approval", 1), FailedPrecondition);
      const waiting = await client.workflow("approval").create(null, { id: uniqueId("fp2") });
      await assert.rejects(waiting.resume(), FailedPrecondition);
      await waiting.terminate();
    });

    test("ResourceExhausted: more watchers than limits.max_watchers", async () => {
      const client = tight.client(transport);
      const instance = await client.workflow("approval").create(null, { id: uniqueId("rx") });
      const first = instance.watch();
      await first.next(); // the stream is open, holding the only slot
      await assert.rejects(
        async () => {
          for await (const _ of instance.watch()) {
            // refused before any event
          }
        },
        refused(ResourceExhausted, Code.ResourceExhausted, /max_watchers/),
      );
      await first.return();
      // The slot is free again once the first stream is closed.
      await eventually(async () => {
        const second = instance.watch();
        try {
          return (await second.next()).done === false ? true : undefined;
        } catch (error) {
          if (error instanceof ResourceExhausted) return undefined;
          throw error;
        } finally {
          await second.return();
        }
      });
      await instance.terminate();
    });

    test("Unavailable: no server at the address, after the retries", async () => {
      const port = await closedPort();
      const down = downClient(transport, port);
      const started = Date.now();
      await assert.rejects(down.listWorkflows(), refused(Unavailable, Code.Unavailable, /./));
      // Reads are retried (5 attempts, backoff from 100 ms): about 1.5 s, well under a minute.
      const took = Date.now() - started;
      assert.ok(took >= 500 && took < 10_000, `took ${took} ms`);
      // A create without an id is never retried: it fails at once.
      const once = Date.now();
      await assert.rejects(down.workflow("three-steps").create(null), Unavailable);
      assert.ok(Date.now() - once < 500);
    });

    test("an aborted call: Canceled, not retried", async () => {
      const instance = await client.workflow("approval").create(null, { id: uniqueId("ab") });
      const controller = new AbortController();
      setTimeout(() => controller.abort(), 200);
      await assert.rejects(
        instance.wait({ signal: controller.signal }),
        (error: unknown) => error instanceof CruzflowError && error.code === Code.Canceled,
      );
      await instance.terminate();
    });
  });

  describe(`auth over ${transport}`, () => {
    test("no token, or a wrong one: Unauthenticated", async () => {
      for (const token of [undefined, "not-a-token"]) {
        const client = guarded.client(transport, token === undefined ? {} : { token });
        await assert.rejects(
          client.listWorkflows(),
          refused(Unauthenticated, Code.Unauthenticated, /bearer token/),
        );
      }
    });

    test("a write token may do everything", async () => {
      const client = guarded.client(transport, { token: secrets.admin });
      const instance = await client.workflow("three-steps").create({ n: 1 }, { id: uniqueId("adm") });
      assert.deepEqual(await instance.result({ timeoutMs: 10_000 }), { sum: 6, params: { n: 1 } });
    });

    test("a read token reads, and may not change anything: PermissionDenied", async () => {
      const admin = guarded.client(transport, { token: secrets.admin });
      const made = await admin.workflow("approval").create(null, { id: uniqueId("rd") });
      const reader = guarded.client(transport, { token: secrets.reader });
      assert.ok((await reader.listWorkflows()).length > 0);
      assert.equal((await reader.instance(made.id).status()).workflow, "approval");
      await assert.rejects(
        reader.workflow("approval").create(null),
        refused(PermissionDenied, Code.PermissionDenied, /.+/),
      );
      await assert.rejects(reader.instance(made.id).terminate(), PermissionDenied);
      await made.terminate();
    });

    test("caller says what each token may do", async () => {
      const asked = await Promise.all(
        [secrets.admin, secrets.reader, secrets.approver].map((token) =>
          guarded.client(transport, { token }).caller(),
        ),
      );
      assert.deepEqual(asked, [
        { authRequired: true, tokenName: "admin", readOnly: false, workflows: [] },
        { authRequired: true, tokenName: "reader", readOnly: true, workflows: [] },
        { authRequired: true, tokenName: "approver", readOnly: false, workflows: ["approval"] },
      ]);
      await assert.rejects(guarded.client(transport).caller(), Unauthenticated);
    });

    test("a token for some workflows only: PermissionDenied for the others", async () => {
      const approver = guarded.client(transport, { token: secrets.approver });
      const mine = await approver.workflow("approval").create(null, { id: uniqueId("apv") });
      await mine.sendEvent("approval", "ok");
      assert.deepEqual(await mine.result({ timeoutMs: 10_000 }), { approved: "ok", type: "approval" });
      await assert.rejects(
        approver.workflow("three-steps").create(null),
        refused(PermissionDenied, Code.PermissionDenied, /three-steps/),
      );
      const admin = guarded.client(transport, { token: secrets.admin });
      const theirs = await admin.workflow("three-steps").create(null, { id: uniqueId("oth") });
      // Another workflow's instance looks, to this token, as if it did not
      // exist: ids are chosen by callers, so "not yours" would let it probe.
      await assert.rejects(approver.instance(theirs.id).status(), InstanceNotFound);
      await assert.rejects(approver.listInstancesPage(), PermissionDenied);
      assert.equal((await approver.listInstancesPage({ workflow: "approval" })).instances[0]?.id, mine.id);
    });
  });
}

test("transport failures count as Unavailable; the server's own codes stay", () => {
  const reset = Object.assign(new Error("read ECONNRESET"), { code: "ECONNRESET" });
  // What connect-node makes of a reset connection: Aborted, with the cause.
  const cut = fromConnectError(new ConnectError("read ECONNRESET", Code.Aborted, undefined, undefined, reset));
  assert.ok(cut instanceof Unavailable);
  assert.equal(cut.code, Code.Unavailable);
  const fetchFailed = new ConnectError("fetch failed", Code.Unknown, undefined, undefined, new TypeError("fetch failed"));
  assert.ok(fromConnectError(fetchFailed) instanceof Unavailable);
  // Sent by a server: no cause, the code as it is.
  const aborted = fromConnectError(new ConnectError("conflict", Code.Aborted));
  assert.equal(aborted.code, Code.Aborted);
  assert.equal(aborted.codeName, "ABORTED");
  assert.equal(fromConnectError(new ConnectError("x", Code.Canceled)).codeName, "CANCELLED");
});

function downClient(transport: TransportName, port: number): Client {
  const baseUrl = `http://127.0.0.1:${port}`;
  return transport === "grpc" ? createGrpcClient({ baseUrl }) : createClient({ baseUrl });
}
