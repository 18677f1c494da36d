/**
 * The seed's onboarding router (`startOnboarding`, `checkOnboardingStatus`),
 * on cruzflow: what a CruzJS main application does with the onboarding
 * workflow, whatever serves it over HTTP.
 */

import type { Client, InstanceInfo, WorkflowBinding } from "@cruzflow/client";

/** The params of examples/onboarding/workflow.py (`OnboardingParams`). */
export interface OnboardingParams {
  userId: string;
  email: string;
  plan: string;
}

/** What the workflow's `run` returns once complete. */
export interface OnboardingOutput {
  success: boolean;
  userId: string;
  projectId: string;
}

/** The seed's status answer: `{ id, status, output, error }`. */
export interface OnboardingStatus {
  id: string;
  status: string;
  output: OnboardingOutput | null;
  error: { name: string; message: string } | null;
}

/** The user an onboarding is for: the session's user in a real app. */
export interface User {
  id: string;
  email: string;
}

export class OnboardingRouter {
  readonly #workflow: WorkflowBinding<OnboardingParams, OnboardingOutput>;
  readonly #client: Client;
  /**
   * The seed's job table: user id -> workflow instance id. In memory here;
   * the instance also carries the lookup key `user:<id>`, so an app that lost
   * its table (a restart) finds the instance again on the server.
   */
  readonly #jobs = new Map<string, string>();

  constructor(client: Client) {
    this.#client = client;
    this.#workflow = client.workflow<OnboardingParams, OnboardingOutput>("onboarding-workflow");
  }

  /**
   * Starts the user's onboarding once: a second call for the same user gives
   * the same workflow id (from the job table, else from the lookup key).
   */
  async startOnboarding(user: User, plan = "pro"): Promise<{ workflowId: string; created: boolean }> {
    const known = await this.findOnboarding(user.id);
    if (known !== undefined) {
      return { workflowId: known, created: false };
    }
    const instance = await this.#workflow.create(
      { userId: user.id, email: user.email, plan },
      { lookupKey: lookupKey(user.id) },
    );
    this.#jobs.set(user.id, instance.id);
    return { workflowId: instance.id, created: true };
  }

  /** The seed's `checkOnboardingStatus`: the instance's status, output and error. */
  async checkOnboardingStatus(workflowId: string): Promise<OnboardingStatus> {
    const info = await (await this.#workflow.get(workflowId)).status();
    return statusOf(info);
  }

  /** The user's onboarding workflow id: the job table's, else the server's by lookup key. */
  async findOnboarding(userId: string): Promise<string | undefined> {
    const known = this.#jobs.get(userId);
    if (known !== undefined) {
      return known;
    }
    const page = await this.#client.listInstancesPage({
      workflow: this.#workflow.name,
      lookupKey: lookupKey(userId),
      pageSize: 1,
    });
    const found = page.instances[0]?.id;
    if (found !== undefined) {
      this.#jobs.set(userId, found);
    }
    return found;
  }

  /** The workflow's events as they happen (see `InstanceHandle.watch`). */
  watch(workflowId: string, signal: AbortSignal) {
    return this.#client.instance<OnboardingParams, OnboardingOutput>(workflowId).watch({ signal });
  }
}

function lookupKey(userId: string): string {
  return `user:${userId}`;
}

function statusOf(info: InstanceInfo<OnboardingParams, OnboardingOutput>): OnboardingStatus {
  return {
    id: info.id,
    status: info.status,
    output: info.output,
    error: info.error ? { name: info.error.name, message: info.error.message } : null,
  };
}
