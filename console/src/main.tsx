/**
 * cruzflow's web console: the instances (filtered, paged, counted per
 * status), one instance with its step timeline and controls, and the
 * workflows with their counts and failure rate. Everything goes through the
 * public API (the TypeScript client over Connect), as any client's calls do.
 */

import { render } from "preact";
import { useCallback, useEffect, useState } from "preact/hooks";
import type { Client } from "@cruzflow/client";
import { connect, describe, isUnauthenticated, storeToken, storedToken, whoAmI, type Caller } from "./api";
import { InstancePage } from "./instance";
import { InstancesPage } from "./instances";
import { Alert } from "./ui";
import { WorkflowsPage } from "./workflows";

export interface Session {
  readonly client: Client;
  readonly caller: Caller;
  /** The link to a trace, from the server's `[console] trace_url`, or "". */
  readonly traceUrl: string;
}

interface Route {
  readonly page: "instances" | "instance" | "workflows";
  readonly id: string;
  readonly query: URLSearchParams;
}

function route(): Route {
  const hash = window.location.hash.replace(/^#/, "") || "/instances";
  const [path = "", search = ""] = hash.split("?", 2);
  const query = new URLSearchParams(search);
  const parts = path.split("/").filter(Boolean);
  if (parts[0] === "workflows") {
    return { page: "workflows", id: "", query };
  }
  if (parts[0] === "instances" && parts[1]) {
    return { page: "instance", id: decodeURIComponent(parts[1]), query };
  }
  return { page: "instances", id: "", query };
}

function useRoute(): Route {
  const [current, setCurrent] = useState(route);
  useEffect(() => {
    const update = (): void => setCurrent(route());
    window.addEventListener("hashchange", update);
    return () => window.removeEventListener("hashchange", update);
  }, []);
  return current;
}

type State =
  | { kind: "checking" }
  | { kind: "token"; error: string | undefined }
  | { kind: "down"; error: string }
  | { kind: "ready"; session: Session };

function traceUrl(): string {
  return document.querySelector<HTMLMetaElement>('meta[name="cruzflow-trace-url"]')?.content ?? "";
}

function App() {
  const [state, setState] = useState<State>({ kind: "checking" });
  const current = useRoute();

  const start = useCallback(async (token: string | undefined) => {
    setState({ kind: "checking" });
    const client = connect(token);
    try {
      const caller = await whoAmI(client);
      storeToken(token);
      setState({ kind: "ready", session: { client, caller, traceUrl: traceUrl() } });
    } catch (error) {
      if (isUnauthenticated(error)) {
        storeToken(undefined);
        setState({ kind: "token", error: token === undefined ? undefined : describe(error) });
      } else {
        setState({ kind: "down", error: describe(error) });
      }
    }
  }, []);

  useEffect(() => {
    void start(storedToken());
  }, [start]);

  const signOut = (): void => {
    storeToken(undefined);
    setState({ kind: "token", error: undefined });
  };

  return (
    <>
      <header class="top">
        <a class="brand" href="#/instances">
          cruzflow
        </a>
        <nav>
          <a href="#/instances" class={current.page !== "workflows" ? "active" : ""}>
            Instances
          </a>
          <a href="#/workflows" class={current.page === "workflows" ? "active" : ""}>
            Workflows
          </a>
        </nav>
        {state.kind === "ready" && state.session.caller.authRequired && (
          <span class="who" data-testid="caller">
            token <b>{state.session.caller.tokenName}</b>
            {state.session.caller.readOnly && <span class="tag">read-only</span>}
            {state.session.caller.workflows.length > 0 && (
              <span class="tag">{state.session.caller.workflows.join(", ")}</span>
            )}
            <button type="button" class="link" onClick={signOut}>
              Sign out
            </button>
          </span>
        )}
      </header>
      <main>
        {state.kind === "checking" && <p class="muted">Connecting…</p>}
        {state.kind === "down" && (
          <>
            <Alert message={`The server did not answer: ${state.error}`} />
            <button type="button" onClick={() => void start(storedToken())}>
              Try again
            </button>
          </>
        )}
        {state.kind === "token" && <TokenForm error={state.error} onToken={(t) => void start(t)} />}
        {state.kind === "ready" && current.page === "instances" && (
          <InstancesPage session={state.session} query={current.query} />
        )}
        {state.kind === "ready" && current.page === "instance" && (
          <InstancePage key={current.id} session={state.session} id={current.id} />
        )}
        {state.kind === "ready" && current.page === "workflows" && <WorkflowsPage session={state.session} />}
      </main>
    </>
  );
}

function TokenForm({ error, onToken }: { error: string | undefined; onToken: (token: string) => void }) {
  const [token, setToken] = useState("");
  return (
    <form
      class="token-form"
      onSubmit={(e) => {
        e.preventDefault();
        if (token.trim()) {
          onToken(token.trim());
        }
      }}
    >
      <h1>Sign in</h1>
      <p>
        This server asks for a bearer token (one of its config's <code>[[auth.tokens]]</code>). It is kept in
        this tab only, until you close it or sign out.
      </p>
      <Alert message={error} />
      <label>
        Token
        <input
          type="password"
          name="token"
          autoComplete="off"
          value={token}
          onInput={(e) => setToken(e.currentTarget.value)}
          autoFocus
        />
      </label>
      <button type="submit" class="primary">
        Sign in
      </button>
    </form>
  );
}

const root = document.getElementById("app");
if (root) {
  render(<App />, root);
}
