/** Small pieces every page uses: status badges, the error banner, dialogs. */

import type { ComponentChildren } from "preact";
import { useEffect, useRef } from "preact/hooks";
import type { InstanceStatus } from "@cruzflow/client";
import { STATUS_WORDS } from "./format";

export function Status({ status }: { status: InstanceStatus }) {
  return (
    <span class={`status status-${status}`} data-status={status}>
      {STATUS_WORDS[status]}
    </span>
  );
}

/** A refusal or failure, in the server's words. */
export function Alert({ message, onClose }: { message: string | undefined; onClose?: () => void }) {
  if (!message) {
    return null;
  }
  return (
    <div class="alert" role="alert">
      <span class="alert-text">{message}</span>
      {onClose && (
        <button type="button" class="link" onClick={onClose} aria-label="Dismiss">
          ✕
        </button>
      )}
    </div>
  );
}

/**
 * A modal dialog (the platform's <dialog>): `onConfirm` runs on the form's
 * submit; the dialog stays open while it runs, and closes when it resolves.
 */
export function Dialog(props: {
  title: string;
  confirm: string;
  danger?: boolean;
  busy?: boolean;
  onConfirm: () => void;
  onCancel: () => void;
  children?: ComponentChildren;
}) {
  const ref = useRef<HTMLDialogElement>(null);
  useEffect(() => {
    const dialog = ref.current;
    if (dialog && !dialog.open) {
      dialog.showModal();
    }
    return () => dialog?.close();
  }, []);
  return (
    <dialog
      ref={ref}
      class="dialog"
      aria-label={props.title}
      onCancel={(e) => {
        e.preventDefault();
        props.onCancel();
      }}
    >
      <form
        method="dialog"
        onSubmit={(e) => {
          e.preventDefault();
          props.onConfirm();
        }}
      >
        <h2>{props.title}</h2>
        {props.children}
        <div class="dialog-buttons">
          <button type="button" onClick={props.onCancel}>
            Cancel
          </button>
          <button type="submit" class={props.danger ? "danger" : "primary"} disabled={props.busy}>
            {props.confirm}
          </button>
        </div>
      </form>
    </dialog>
  );
}

/** Calls `tick` every `ms` while the tab is visible, and once when it shows again. */
export function usePoll(tick: () => void, ms: number, active: boolean): void {
  const saved = useRef(tick);
  saved.current = tick;
  useEffect(() => {
    if (!active) {
      return undefined;
    }
    const run = (): void => {
      if (document.visibilityState === "visible") {
        saved.current();
      }
    };
    const timer = window.setInterval(run, ms);
    document.addEventListener("visibilitychange", run);
    return () => {
      window.clearInterval(timer);
      document.removeEventListener("visibilitychange", run);
    };
  }, [ms, active]);
}
