/**
 * The errors of the cruzflow client, as in the Python client
 * (`cruzflow.client.errors`).
 *
 * Every failure the client throws is a {@link CruzflowError}. A refused call
 * carries the status `code` (Connect's {@link Code}, the gRPC numbering) and
 * the server's `details`, which say how to mend the request; the outcome of
 * an instance that did not complete is {@link WorkflowFailed} or
 * {@link WorkflowTerminated}, and `code` is `undefined` there:
 *
 * ```text
 * CruzflowError
 * ├── NotFound
 * │   ├── InstanceNotFound
 * │   └── WorkflowNotFound
 * ├── InstanceAlreadyExists
 * ├── InvalidArgument
 * ├── FailedPrecondition
 * ├── ResourceExhausted
 * ├── Unavailable
 * ├── DeadlineExceeded
 * ├── Unauthenticated
 * ├── PermissionDenied
 * ├── WorkflowFailed
 * ├── WorkflowTerminated
 * └── ResultTimeout
 * ```
 *
 * Any other code (`Internal`, `Canceled`, ...) is thrown as a plain
 * `CruzflowError` with that code.
 *
 * @module
 */

import { Code, ConnectError } from "@connectrpc/connect";
import type { InstanceStatus } from "./types.js";

export { Code };

/** Options of {@link CruzflowError}'s constructor. */
export interface CruzflowErrorOptions {
  /** The status code of a refused call; none for an instance's own outcome. */
  code?: Code | undefined;
  /** The instance the call was about, when there was one. */
  instanceId?: string | undefined;
  /** The error this one was made from (a `ConnectError`, a `TypeError` of `fetch`). */
  cause?: unknown;
}

/**
 * Base class of every error the client throws.
 *
 * `code` is the status code of a refused call (`undefined` for an instance's
 * own outcome, such as {@link WorkflowFailed}), `details` the server's
 * message, and `instanceId` the instance the call was about, when there was
 * one.
 */
export class CruzflowError extends Error {
  override name = "CruzflowError";
  /** The status code of a refused call, e.g. `Code.NotFound`; see {@link codeName}. */
  readonly code: Code | undefined;
  /** The server's message (or the client's own, for a check made before any call). */
  readonly details: string;
  /** The instance the call was about, when there was one. */
  readonly instanceId: string | undefined;

  constructor(details: string, options: CruzflowErrorOptions = {}) {
    super(details, options.cause === undefined ? undefined : { cause: options.cause });
    this.details = details;
    this.code = options.code;
    this.instanceId = options.instanceId;
  }

  /** The code's name as the gRPC status codes spell it, e.g. `"NOT_FOUND"`. */
  get codeName(): string | undefined {
    return this.code === undefined ? undefined : codeName(this.code);
  }
}

/** `NOT_FOUND`: the named instance or workflow does not exist. */
export class NotFound extends CruzflowError {
  override name = "NotFound";
}

/** No instance has this id (never created, or purged after its retention). */
export class InstanceNotFound extends NotFound {
  override name = "InstanceNotFound";
}

/** The server hosts no workflow of this name (see `client.listWorkflows()`). */
export class WorkflowNotFound extends NotFound {
  override name = "WorkflowNotFound";
}

/**
 * `ALREADY_EXISTS`: an instance with this id exists already.
 *
 * `create({ id, ifExists: "return" })` returns the existing instance instead
 * of throwing this.
 */
export class InstanceAlreadyExists extends CruzflowError {
  override name = "InstanceAlreadyExists";
}

/**
 * `INVALID_ARGUMENT`: a field is malformed, too large or out of range.
 *
 * Also thrown before any call is made for arguments the client can check
 * itself (params that are not JSON, an empty id, ...).
 */
export class InvalidArgument extends CruzflowError {
  override name = "InvalidArgument";
}

/**
 * `FAILED_PRECONDITION`: the call does not fit the instance's state (pausing
 * a finished instance, sending an event to one, ...).
 */
export class FailedPrecondition extends CruzflowError {
  override name = "FailedPrecondition";
}

/** `RESOURCE_EXHAUSTED`: a limit was hit (too many watchers, a message too large). */
export class ResourceExhausted extends CruzflowError {
  override name = "ResourceExhausted";
}

/**
 * `UNAVAILABLE`: the server cannot be reached, or is shutting down.
 *
 * Thrown only once the client's retry policy gave up, or for a call it must
 * not retry (see {@link RetryPolicy}). A `fetch` that failed on the network
 * (a `TypeError`, as every `fetch` reports it) is one too.
 */
export class Unavailable extends CruzflowError {
  override name = "Unavailable";
}

/** `DEADLINE_EXCEEDED`: the call's deadline (its `timeoutMs`) passed first. */
export class DeadlineExceeded extends CruzflowError {
  override name = "DeadlineExceeded";
}

/** `UNAUTHENTICATED`: the server wants credentials (`createClient({ token })`). */
export class Unauthenticated extends CruzflowError {
  override name = "Unauthenticated";
}

/** `PERMISSION_DENIED`: the credentials do not allow this call. */
export class PermissionDenied extends CruzflowError {
  override name = "PermissionDenied";
}

/**
 * The instance ended `errored`; thrown by `InstanceHandle.result()`.
 *
 * `errorName` and `errorMessage` are the exception class name and text the
 * workflow failed with (`"ValueError"`, `"bad input row 7"`), and
 * `errorTraceback` where it was raised (`undefined` if no code raised it).
 */
export class WorkflowFailed extends CruzflowError {
  override name = "WorkflowFailed";
  readonly errorName: string;
  readonly errorMessage: string;
  readonly errorTraceback: string | undefined;

  constructor(
    instanceId: string,
    errorName: string,
    errorMessage: string,
    errorTraceback?: string,
  ) {
    super(`instance '${instanceId}' failed: ${errorName}: ${errorMessage}`, { instanceId });
    this.errorName = errorName;
    this.errorMessage = errorMessage;
    this.errorTraceback = errorTraceback;
  }
}

/** The instance was terminated; thrown by `InstanceHandle.result()`. */
export class WorkflowTerminated extends CruzflowError {
  override name = "WorkflowTerminated";

  constructor(instanceId: string) {
    super(`instance '${instanceId}' was terminated`, { instanceId });
  }
}

/**
 * `InstanceHandle.wait()` or `result()` ran out of time before the instance
 * finished; `status` is its status at that moment. The instance itself goes on.
 */
export class ResultTimeout extends CruzflowError {
  override name = "ResultTimeout";
  readonly timeoutMs: number;
  readonly status: InstanceStatus;

  constructor(instanceId: string, timeoutMs: number, status: InstanceStatus) {
    super(`instance '${instanceId}' did not finish within ${timeoutMs} ms (it is ${status})`, {
      instanceId,
    });
    this.timeoutMs = timeoutMs;
    this.status = status;
  }
}

type ErrorClass = new (details: string, options?: CruzflowErrorOptions) => CruzflowError;

const BY_CODE = new Map<Code, ErrorClass>([
  [Code.AlreadyExists, InstanceAlreadyExists],
  [Code.InvalidArgument, InvalidArgument],
  [Code.FailedPrecondition, FailedPrecondition],
  [Code.ResourceExhausted, ResourceExhausted],
  [Code.Unavailable, Unavailable],
  [Code.DeadlineExceeded, DeadlineExceeded],
  [Code.Unauthenticated, Unauthenticated],
  [Code.PermissionDenied, PermissionDenied],
]);

// The server names the field at fault first: "workflow: 'x' is not registered
// ..." for one create, "requests[3].workflow: ..." for an item of a batch; an
// unknown instance is "instance_id: no instance ...".
const WORKFLOW_FIELD = /^(?:requests\[\d+\]\.)?workflow:/;

// Node's codes for a connection that could not be made or was cut: a server
// out of reach, restarting or killed. connect-node reads ECONNRESET as
// Aborted, and HTTP/2 session failures as Internal or Unknown.
const NETWORK_CODES = new Set([
  "ECONNREFUSED",
  "ECONNRESET",
  "EPIPE",
  "ETIMEDOUT",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "EAI_AGAIN",
  "ERR_HTTP2_GOAWAY_SESSION",
  "ERR_HTTP2_SESSION_ERROR",
  "ERR_HTTP2_STREAM_CANCEL",
  "ERR_HTTP2_INVALID_SESSION",
  "ERR_HTTP2_ERROR",
  "UND_ERR_SOCKET",
]);

function causes(error: unknown): unknown[] {
  const chain: unknown[] = [];
  while (error instanceof Error && !chain.includes(error) && chain.length < 8) {
    chain.push(error);
    error = error.cause;
  }
  return chain;
}

/**
 * The status code a failure counts as: `Unavailable` (as gRPC says) for a
 * server out of reach, however the transport reported it. A `fetch` that
 * failed on the network rejects with a `TypeError` (the Fetch standard says
 * so; browsers, Node, Deno and Workers do so), which Connect wraps as
 * `Unknown`; on Node a refused or reset connection carries its `code`
 * (`ECONNRESET`, ...). A refusal sent by the server carries no cause, so it
 * keeps its own code.
 */
export function effectiveCode(error: ConnectError): Code {
  if (error.cause === undefined || error.code === Code.Unavailable) {
    return error.code;
  }
  const chain = causes(error.cause);
  if (error.code === Code.Unknown && chain.some((e) => e instanceof TypeError)) {
    return Code.Unavailable;
  }
  const network = chain.some((e) => {
    const code = (e as { code?: unknown }).code;
    return typeof code === "string" && NETWORK_CODES.has(code);
  });
  if (network && (error.code === Code.Aborted || error.code === Code.Internal || error.code === Code.Unknown)) {
    return Code.Unavailable;
  }
  return error.code;
}

/** The {@link CruzflowError} for a failed call (a `ConnectError`, or anything thrown). */
export function fromConnectError(reason: unknown, instanceId?: string): CruzflowError {
  if (reason instanceof CruzflowError) {
    return reason;
  }
  const error = ConnectError.from(reason);
  const code = effectiveCode(error);
  const details = error.rawMessage || codeName(code);
  let kind: ErrorClass;
  if (code === Code.NotFound) {
    kind = WORKFLOW_FIELD.test(details) ? WorkflowNotFound : InstanceNotFound;
  } else {
    kind = BY_CODE.get(code) ?? CruzflowError;
  }
  return new kind(details, { code, instanceId, cause: reason });
}

/** `Code.NotFound` as gRPC spells it: `"NOT_FOUND"`. */
export function codeName(code: Code): string {
  if (code === Code.Canceled) {
    return "CANCELLED"; // Connect spells it with one L
  }
  const name = Code[code] as string | undefined;
  return name === undefined ? String(code) : name.replace(/(?<=[a-z])(?=[A-Z])/g, "_").toUpperCase();
}
