"""The shared checkpoint store: PostgreSQL through asyncpg, for N servers.

Each group-committed batch is one call of ``cruzflow_apply``, a PL/pgSQL
function installed by a migration: the batch goes as one array per column
(``unnest`` turns them back into rows), and the function does every write,
the fencing and the notification in the one implicit transaction of that
statement. So a batch costs one round trip and one durable commit however
many instances it carries.

Ownership: ``servers`` holds one row per lease (the epoch comes from its
identity sequence, the expiry from the database's clock, so the servers'
clocks do not matter). An instance row names the lease that holds it
(``owner``, ``epoch``); a write moving it to waiting, paused or a final
status frees it in the same transaction. ``apply`` writes an instance only
while its row names this lease and the lease is alive; ``claim`` takes rows
with ``FOR UPDATE SKIP LOCKED``, so concurrent claimers never take the same
one.

Other servers hear of commits by LISTEN/NOTIFY on one channel: each batch
sends its instance ids in as few notifications as the payload limit allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from cruzflow.server.records import (
    ABANDONED,
    UNFINISHED,
    Batch,
    Command,
    EventRecord,
    InboxEvent,
    InstanceQuery,
    InstanceRecord,
    InstanceStatus,
    Lease,
    Notice,
    NoticeKind,
    Refusal,
    ScheduleOrigin,
    ScheduleRecord,
    StepRecord,
)
from cruzflow.server.store.base import HELD_ELSEWHERE, READ_BATCH, StoreError
from cruzflow.server.store.rows import event_of, inbox_of, instance_of, schedule_of, step_of

log = logging.getLogger("cruzflow.store")

CHANNEL = "cruzflow"
"""The LISTEN/NOTIFY channel every server of one database listens on."""

# Runnable (queued, running, pausing): what claim takes. A write that moves an
# instance to any other status but queued frees it: waiting and paused ones
# are woken or resumed by whichever server gets there, finished ones by none.
_RUNNABLE = "1, 2, 5"
_FREEING = "3, 4, 6, 7, 8"
_FINISHED = "6, 7, 8"
# Held by this lock while migrating: several servers starting at once migrate
# one after the other (the later ones find the schema current).
_MIGRATION_LOCK = 0x63727A666C6F77  # "crzflow"
# The first key of the advisory locks that serialize a workflow's gate openings.
_GATE_LOCK = 0x67617465  # "gate"
# A notification's payload must stay under 8,000 bytes: larger batches are
# told in several, still in the batch's one transaction.
_NOTIFY_BYTES = 7000

# The columns of an InstanceRecord, in the order _instance reads them.
_COLUMNS = (
    "id, workflow, status, params, created_at, updated_at, output, error_name, error_message,"
    " ended_at, lookup_key, wake_at, trace_parent, error_traceback, run_started_at"
)
_LAST_SEQ = (
    "COALESCE((SELECT e.seq FROM events e WHERE e.instance_id = {0}.id"
    " ORDER BY e.seq DESC LIMIT 1), 0)"
)
# A function returning instance records names its columns r_*, so that they
# cannot be mistaken for the table's own inside PL/pgSQL.
_RECORD_TABLE = (
    "r_id text, r_workflow text, r_status smallint, r_params bytea, r_created_at bigint,"
    " r_updated_at bigint, r_output bytea, r_error_name text, r_error_message text,"
    " r_ended_at bigint, r_lookup_key text, r_wake_at bigint, r_trace_parent text,"
    " r_error_traceback text, r_run_started_at bigint, r_last_seq bigint"
)


def _prefixed(alias: str) -> str:
    return ", ".join(f"{alias}.{c.strip()}" for c in _COLUMNS.split(","))


# A lease is alive while its row says so, by the database's clock.
_LIVE = "EXISTS (SELECT 1 FROM servers s WHERE s.epoch = {0} AND s.expires_at > clock_timestamp())"

# Columns of a new instance added after the first schema (see _apply_function).
_LINK_COLUMNS = (("parent_id", "text"), ("abandon", "boolean"))


def _apply_function(extra: tuple[tuple[str, str], ...] = ()) -> str:
    """cruzflow_apply's definition, its new instances carrying the ``extra``
    columns (name, type) beyond those of the first schema. Each migration that
    adds such a column redefines the function with them all; the first
    migration's is the one without."""
    n_args = "".join(f"\n        n_{name} {kind}[]," for name, kind in extra)
    cols = "".join(f", {name}" for name, _ in extra)
    n_cols = "".join(f", n.{name}" for name, _ in extra)
    n_arrays = "".join(f", n_{name}" for name, _ in extra)
    return f"""    -- One batch, in the caller's one statement: see PostgresStore.apply.
    CREATE FUNCTION cruzflow_apply(
        lease_owner text, lease_epoch bigint, token uuid,
        n_id text[], n_workflow text[], n_status smallint[], n_params bytea[],
        n_output bytea[], n_error_name text[], n_error_message text[], n_created_at bigint[],
        n_updated_at bigint[], n_ended_at bigint[], n_lookup_key text[], n_wake_at bigint[],
        n_trace_parent text[], n_error_traceback text[], n_run_started_at bigint[],{n_args}
        u_id text[], u_status smallint[], u_updated_at bigint[], u_output bytea[],
        u_error_name text[], u_error_message text[], u_ended_at bigint[], u_wake_at bigint[],
        u_error_traceback text[], u_run_started_at bigint[],
        c_id text[],
        s_instance_id text[], s_idx integer[], s_name text[], s_occurrence integer[],
        s_status smallint[], s_attempts integer[], s_started_at bigint[], s_ended_at bigint[],
        s_output bytea[], s_error_name text[], s_error_message text[],
        s_next_attempt_at bigint[], s_kind smallint[], s_event_type text[],
        s_error_traceback text[],
        e_instance_id text[], e_seq bigint[], e_at bigint[], e_kind smallint[], e_data text[],
        e_payload bytea[],
        b_instance_id text[], b_type text[], b_payload bytea[], b_at bigint[],
        b_trace_parent text[],
        k_id bigint[], k_instance_id text[], k_step integer[],
        p_id text[], p_before bigint[],
        OUT conflicts text[], OUT fenced text[], OUT purged integer
    ) LANGUAGE plpgsql AS $$
    #variable_conflict use_column
    DECLARE
        live boolean;
        seen uuid;
        done jsonb;
        touched text[];
        owned text[] := '{{}}';
        inserted text[];
        allowed jsonb;
        doomed text[];
        notices text[];
    BEGIN
        -- The lease's row, locked until commit (renew and release wait): is it
        -- alive, and which batch did it apply last?
        SELECT s.expires_at > clock_timestamp(), s.batch_token, s.batch_result
          INTO live, seen, done
          FROM servers s WHERE s.epoch = lease_epoch AND s.owner = lease_owner
          FOR NO KEY UPDATE;
        IF seen = token THEN
            -- A retry of the batch whose commit's reply was lost: it is applied.
            conflicts := ARRAY(SELECT jsonb_array_elements_text(done -> 'conflicts'));
            fenced := ARRAY(SELECT jsonb_array_elements_text(done -> 'fenced'));
            purged := (done ->> 'purged')::integer;
            RETURN;
        END IF;
        live := coalesce(live, false);

        -- Existing instances the batch writes: only those this lease holds,
        -- locked in id order until commit, so no claim takes them meanwhile.
        IF cardinality(n_id) = 0 THEN
            -- The usual batch of steps: no new instance to leave out.
            touched := ARRAY(SELECT DISTINCT unnest(
                u_id || c_id || s_instance_id || e_instance_id || k_instance_id));
        ELSE
            touched := ARRAY(
                SELECT unnest(u_id || c_id || s_instance_id || e_instance_id || k_instance_id)
                EXCEPT SELECT unnest(n_id));
        END IF;
        IF live AND cardinality(touched) > 0 THEN
            owned := ARRAY(
                SELECT i.id FROM instances i
                WHERE i.id = ANY(touched) AND i.owner = lease_owner AND i.epoch = lease_epoch
                ORDER BY i.id FOR NO KEY UPDATE);
        END IF;

        -- New instances: held by this lease when it runs them, else by none.
        -- One that would be held needs a live lease; a taken id is a conflict.
        inserted := '{{}}';
        conflicts := '{{}}';
        IF cardinality(n_id) > 0 THEN
        WITH ins AS (
            INSERT INTO instances (id, workflow, status, params, output, error_name,
                error_message, created_at, updated_at, ended_at, lookup_key, wake_at,
                trace_parent, error_traceback, run_started_at{cols}, owner, epoch)
            SELECT n.id, n.workflow, n.status, n.params, n.output, n.error_name,
                n.error_message, n.created_at, n.updated_at, n.ended_at, n.lookup_key,
                n.wake_at, n.trace_parent, n.error_traceback, n.run_started_at{n_cols},
                CASE WHEN n.status IN (2, 5) THEN lease_owner END,
                CASE WHEN n.status IN (2, 5) THEN lease_epoch END
            FROM unnest(n_id, n_workflow, n_status, n_params, n_output, n_error_name,
                n_error_message, n_created_at, n_updated_at, n_ended_at, n_lookup_key,
                n_wake_at, n_trace_parent, n_error_traceback, n_run_started_at{n_arrays})
                WITH ORDINALITY AS n(id, workflow, status, params, output, error_name,
                error_message, created_at, updated_at, ended_at, lookup_key, wake_at,
                trace_parent, error_traceback, run_started_at{cols}, ord)
            WHERE live OR n.status NOT IN (2, 5)
            ORDER BY n.ord
            ON CONFLICT (id) DO NOTHING
            RETURNING id)
        SELECT coalesce(array_agg(ins.id), '{{}}') INTO inserted FROM ins;
        conflicts := ARRAY(
            SELECT n.id FROM unnest(n_id, n_status) AS n(id, status)
            WHERE live OR n.status NOT IN (2, 5)
            EXCEPT SELECT unnest(inserted));
        END IF;
        IF cardinality(owned) = cardinality(touched) AND (live OR cardinality(n_id) = 0) THEN
            fenced := '{{}}';  -- the usual case: every instance written is this lease's
        ELSE
            fenced := ARRAY(SELECT unnest(touched) EXCEPT SELECT unnest(owned))
                || ARRAY(SELECT n.id FROM unnest(n_id, n_status) AS n(id, status)
                         WHERE NOT live AND n.status IN (2, 5));
        END IF;
        -- The instances whose writes land, as a set with a logarithmic lookup.
        SELECT coalesce(jsonb_object_agg(x, true), '{{}}') INTO allowed
          FROM (SELECT unnest(owned) UNION ALL SELECT unnest(inserted)) AS a(x);

        IF cardinality(u_id) > 0 THEN
            UPDATE instances i SET status = u.status, output = u.output,
                error_name = u.error_name, error_message = u.error_message,
                updated_at = u.updated_at, ended_at = u.ended_at, wake_at = u.wake_at,
                error_traceback = u.error_traceback,
                run_started_at = coalesce(u.run_started_at, i.run_started_at),
                owner = CASE WHEN u.status IN ({_FREEING}) THEN NULL
                             WHEN u.status IN (2, 5) THEN lease_owner ELSE i.owner END,
                epoch = CASE WHEN u.status IN ({_FREEING}) THEN NULL
                             WHEN u.status IN (2, 5) THEN lease_epoch ELSE i.epoch END
            FROM unnest(u_id, u_status, u_updated_at, u_output, u_error_name, u_error_message,
                u_ended_at, u_wake_at, u_error_traceback, u_run_started_at)
                AS u(id, status, updated_at, output, error_name, error_message, ended_at,
                wake_at, error_traceback, run_started_at)
            WHERE i.id = u.id AND allowed ? u.id;
        END IF;

        -- A restart: the instance's steps go before this batch's steps land.
        IF cardinality(c_id) > 0 THEN
            DELETE FROM steps WHERE instance_id = ANY(
                ARRAY(SELECT x FROM unnest(c_id) AS c(x) WHERE allowed ? x));
        END IF;

        IF cardinality(s_instance_id) > 0 THEN
            INSERT INTO steps (instance_id, idx, name, occurrence, status, attempts, started_at,
                ended_at, output, error_name, error_message, next_attempt_at, kind, event_type,
                error_traceback)
            SELECT s.* FROM unnest(s_instance_id, s_idx, s_name, s_occurrence, s_status,
                s_attempts, s_started_at, s_ended_at, s_output, s_error_name, s_error_message,
                s_next_attempt_at, s_kind, s_event_type, s_error_traceback)
                AS s(instance_id, idx, name, occurrence, status, attempts, started_at, ended_at,
                output, error_name, error_message, next_attempt_at, kind, event_type,
                error_traceback)
            WHERE allowed ? s.instance_id
            ON CONFLICT (instance_id, idx) DO UPDATE SET status = excluded.status,
                attempts = excluded.attempts, ended_at = excluded.ended_at,
                output = excluded.output, error_name = excluded.error_name,
                error_message = excluded.error_message,
                next_attempt_at = excluded.next_attempt_at,
                error_traceback = excluded.error_traceback;
        END IF;

        IF cardinality(e_instance_id) > 0 THEN
            INSERT INTO events (instance_id, seq, at, kind, data, payload)
            SELECT e.instance_id, e.seq, e.at, e.kind, e.data::jsonb, e.payload
            FROM unnest(e_instance_id, e_seq, e_at, e_kind, e_data, e_payload)
                AS e(instance_id, seq, at, kind, data, payload)
            WHERE allowed ? e.instance_id;
        END IF;

        -- Events sent to an instance: any server accepts them for any instance.
        IF cardinality(b_instance_id) > 0 THEN
            INSERT INTO inbox (instance_id, type, payload, at, trace_parent)
            SELECT b.instance_id, b.type, b.payload, b.at, b.trace_parent
            FROM unnest(b_instance_id, b_type, b_payload, b_at, b_trace_parent)
                WITH ORDINALITY AS b(instance_id, type, payload, at, trace_parent, ord)
            ORDER BY b.ord;
        END IF;

        IF cardinality(k_id) > 0 THEN
            UPDATE inbox b SET consumed_by = k.step
            FROM unnest(k_id, k_instance_id, k_step) AS k(id, instance_id, step)
            WHERE b.id = k.id AND b.instance_id = k.instance_id AND allowed ? k.instance_id;
        END IF;

        -- Retention, last: an instance this batch revived stays.
        purged := 0;
        IF cardinality(p_id) > 0 THEN
            doomed := ARRAY(
                SELECT i.id FROM instances i
                JOIN unnest(p_id, p_before) AS p(id, before) ON i.id = p.id
                WHERE i.ended_at < p.before AND i.status IN ({_FINISHED})
                ORDER BY i.id FOR UPDATE OF i);
            IF cardinality(doomed) > 0 THEN
                DELETE FROM steps WHERE instance_id = ANY(doomed);
                DELETE FROM events WHERE instance_id = ANY(doomed);
                DELETE FROM inbox WHERE instance_id = ANY(doomed);
                DELETE FROM instances WHERE id = ANY(doomed);
                purged := cardinality(doomed);
            END IF;
        END IF;

        -- Tell the other servers: the instances with new events (up to which
        -- seq), and those now runnable: created queued, or sent an event while
        -- waiting, or while running (it may be parking this very moment, its
        -- waiting status not yet committed: its server is told to look again).
        notices := ARRAY(
            SELECT json_build_array({int(NoticeKind.EVENTS)}, e.instance_id, max(e.seq))::text
            FROM unnest(e_instance_id, e_seq) AS e(instance_id, seq)
            WHERE allowed ? e.instance_id GROUP BY e.instance_id);
        IF cardinality(n_id) > 0 OR cardinality(b_instance_id) > 0 THEN
        notices := notices || ARRAY(
            SELECT json_build_array({int(NoticeKind.RUNNABLE)}, i.id, 0)::text
            FROM instances i
            WHERE i.id = ANY(ARRAY(
                SELECT n.id FROM unnest(n_id, n_status) AS n(id, status)
                WHERE n.status = 1 AND allowed ? n.id))
              AND i.status = 1 AND i.epoch IS NULL
            UNION ALL
            SELECT json_build_array({int(NoticeKind.RUNNABLE)}, i.id, 0)::text
            FROM instances i
            WHERE i.id = ANY(ARRAY(SELECT DISTINCT unnest(b_instance_id)))
              AND i.status IN (2, 4));
        END IF;
        IF cardinality(notices) > 0 THEN
            PERFORM cruzflow_notify(lease_epoch, notices);
        END IF;

        UPDATE servers SET batch_token = token,
            batch_result = jsonb_build_object(
                'conflicts', to_jsonb(conflicts), 'fenced', to_jsonb(fenced), 'purged', purged)
        WHERE epoch = lease_epoch AND owner = lease_owner;
    END $$;
"""


# Each entry moves the schema one version up; never edit a released one.
MIGRATIONS: list[str] = [
    f"""
    CREATE TABLE meta (
        key text PRIMARY KEY,
        value bytea NOT NULL
    );
    -- One row per lease. The last batch applied under it is remembered, so a
    -- batch retried after the reply to its commit was lost is not applied twice.
    CREATE TABLE servers (
        epoch bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        owner text NOT NULL,
        expires_at timestamptz NOT NULL,
        batch_token uuid,
        batch_result jsonb
    );
    CREATE TABLE instances (
        pk bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id text NOT NULL UNIQUE,
        workflow text NOT NULL,
        status smallint NOT NULL,
        params bytea NOT NULL,
        output bytea,
        error_name text,
        error_message text,
        error_traceback text,
        created_at bigint NOT NULL,
        updated_at bigint NOT NULL,
        ended_at bigint,
        lookup_key text,
        wake_at bigint,
        trace_parent text,
        run_started_at bigint,
        -- The lease that holds the instance, or NULL.
        owner text,
        epoch bigint
    );
    -- What claim takes: runnable instances no lease holds, oldest first ...
    CREATE INDEX instances_claimable ON instances (pk)
        WHERE status IN ({_RUNNABLE}) AND epoch IS NULL;
    -- ... and those of dead leases; release frees its own by this index too.
    CREATE INDEX instances_held ON instances (epoch) WHERE epoch IS NOT NULL;
    -- When a WAITING instance resumes by itself (sleep end, event timeout).
    CREATE INDEX instances_waking ON instances (wake_at) WHERE wake_at IS NOT NULL;
    -- Listing, newest first (pk order is creation order), by each filter.
    CREATE INDEX instances_by_workflow ON instances (workflow, pk);
    CREATE INDEX instances_by_status ON instances (status, pk);
    CREATE INDEX instances_by_lookup ON instances (lookup_key, pk) WHERE lookup_key IS NOT NULL;
    -- Retention: finished instances by when they ended.
    CREATE INDEX instances_ended ON instances (ended_at) WHERE ended_at IS NOT NULL;
    CREATE TABLE steps (
        instance_id text NOT NULL,
        idx integer NOT NULL,
        name text NOT NULL,
        occurrence integer NOT NULL,
        status smallint NOT NULL,
        attempts integer NOT NULL,
        started_at bigint NOT NULL,
        ended_at bigint,
        output bytea,
        error_name text,
        error_message text,
        next_attempt_at bigint,
        kind smallint NOT NULL DEFAULT 1,
        event_type text,
        error_traceback text,
        PRIMARY KEY (instance_id, idx)
    );
    CREATE TABLE events (
        instance_id text NOT NULL,
        seq bigint NOT NULL,
        at bigint NOT NULL,
        kind smallint NOT NULL,
        data jsonb NOT NULL,
        payload bytea,
        PRIMARY KEY (instance_id, seq)
    );
    CREATE TABLE inbox (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        instance_id text NOT NULL,
        type text NOT NULL,
        payload bytea NOT NULL,
        at bigint NOT NULL,
        trace_parent text,
        consumed_by integer
    );
    CREATE INDEX inbox_pending ON inbox (instance_id, type, id) WHERE consumed_by IS NULL;
    CREATE INDEX inbox_by_instance ON inbox (instance_id);

    -- Tell the other servers: items are JSON arrays [kind, instance id, seq],
    -- sent as {{"from": epoch, "n": [items]}} in payloads under the limit.
    CREATE FUNCTION cruzflow_notify(sender bigint, items text[]) RETURNS void
    LANGUAGE plpgsql AS $$
    DECLARE
        chunk text := '';
        item text;
    BEGIN
        FOREACH item IN ARRAY items LOOP
            IF chunk <> '' AND octet_length(chunk) + octet_length(item) > {_NOTIFY_BYTES} THEN
                PERFORM pg_notify('{CHANNEL}', '{{"from":' || sender || ',"n":[' || chunk || ']}}');
                chunk := '';
            END IF;
            chunk := CASE WHEN chunk = '' THEN item ELSE chunk || ',' || item END;
        END LOOP;
        IF chunk <> '' THEN
            PERFORM pg_notify('{CHANNEL}', '{{"from":' || sender || ',"n":[' || chunk || ']}}');
        END IF;
    END $$;

{_apply_function()}
    -- Up to p_limit runnable instances no live lease holds, oldest first, now
    -- held by the caller's lease.
    CREATE FUNCTION cruzflow_claim(p_owner text, p_epoch bigint, p_limit integer)
    RETURNS TABLE ({_RECORD_TABLE})
    LANGUAGE plpgsql AS $$
    #variable_conflict use_column
    DECLARE
        fresh bigint[];
        orphans bigint[];
        picked bigint[];
    BEGIN
        IF NOT EXISTS (SELECT 1 FROM servers s WHERE s.epoch = p_epoch AND s.owner = p_owner
                       AND s.expires_at > clock_timestamp()) THEN
            RETURN;
        END IF;
        -- Runnable instances no lease holds, and those of dead leases, each an
        -- index search in pk order, locked as found; rows another claimer
        -- locked are passed over, not waited for.
        fresh := ARRAY(
            SELECT u.pk FROM instances u
            WHERE u.status IN ({_RUNNABLE}) AND u.epoch IS NULL
            ORDER BY u.pk LIMIT p_limit
            FOR UPDATE SKIP LOCKED);
        orphans := ARRAY(
            SELECT d.pk FROM servers s JOIN instances d ON d.epoch = s.epoch
            WHERE s.expires_at <= clock_timestamp() AND d.status IN ({_RUNNABLE})
            ORDER BY d.pk LIMIT p_limit
            FOR UPDATE OF d SKIP LOCKED);
        picked := ARRAY(SELECT x FROM unnest(fresh || orphans) AS c(x) ORDER BY x LIMIT p_limit);
        -- A new statement, a new snapshot: check again what the locks now hold.
        RETURN QUERY
        WITH taken AS (
            UPDATE instances i SET owner = p_owner, epoch = p_epoch
            WHERE i.pk = ANY(picked) AND i.status IN ({_RUNNABLE})
              AND (i.epoch IS NULL OR NOT {_LIVE.format("i.epoch")})
            RETURNING i.*)
        SELECT {_prefixed("t")}, {_LAST_SEQ.format("t")} FROM taken t ORDER BY t.pk;
    END $$;

    -- The instance, now held by the caller's lease: r_outcome 'ok'; 'held'
    -- with r_owner when another live lease holds it; 'lost' when the
    -- caller's lease is dead; no row when there is no such instance.
    CREATE FUNCTION cruzflow_claim_one(p_owner text, p_epoch bigint, p_id text)
    RETURNS TABLE (r_outcome text, r_holder text, {_RECORD_TABLE})
    LANGUAGE plpgsql AS $$
    #variable_conflict use_column
    DECLARE
        h_owner text;
        h_epoch bigint;
    BEGIN
        IF NOT EXISTS (SELECT 1 FROM servers s WHERE s.epoch = p_epoch AND s.owner = p_owner
                       AND s.expires_at > clock_timestamp()) THEN
            r_outcome := 'lost';
            RETURN NEXT;
            RETURN;
        END IF;
        -- Waits for a batch or claim that holds the row, then reads it afresh.
        PERFORM 1 FROM instances i WHERE i.id = p_id FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        SELECT i.owner, i.epoch INTO h_owner, h_epoch FROM instances i WHERE i.id = p_id;
        IF h_epoch IS NOT NULL AND h_epoch <> p_epoch AND {_LIVE.format("h_epoch")} THEN
            r_outcome := 'held';
            r_holder := h_owner;
            RETURN NEXT;
            RETURN;
        END IF;
        IF h_epoch IS DISTINCT FROM p_epoch THEN
            UPDATE instances i SET owner = p_owner, epoch = p_epoch WHERE i.id = p_id;
        END IF;
        RETURN QUERY SELECT 'ok'::text, NULL::text, {_prefixed("i")}, {_LAST_SEQ.format("i")}
            FROM instances i WHERE i.id = p_id;
    END $$;

    -- End a lease: its instances are free at once, and the other servers are
    -- told of the runnable ones.
    CREATE FUNCTION cruzflow_release(p_owner text, p_epoch bigint) RETURNS integer
    LANGUAGE plpgsql AS $$
    #variable_conflict use_column
    DECLARE
        freed text[];
    BEGIN
        WITH f AS (
            UPDATE instances i SET owner = NULL, epoch = NULL
            WHERE i.epoch = p_epoch AND i.owner = p_owner
            RETURNING i.id, i.status)
        SELECT coalesce(array_agg(json_build_array({int(NoticeKind.RUNNABLE)}, f.id, 0)::text)
                        FILTER (WHERE f.status IN ({_RUNNABLE})), '{{}}')
          INTO freed FROM f;
        DELETE FROM servers s WHERE s.epoch = p_epoch AND s.owner = p_owner;
        IF cardinality(freed) > 0 THEN
            PERFORM cruzflow_notify(p_epoch, freed);
        END IF;
        RETURN cardinality(freed);
    END $$;
    """,
    """
    -- Control calls for an instance another server runs: the asking server
    -- records one, the holder takes it (or its asker gives it up) and
    -- answers it.
    CREATE TABLE commands (
        id text PRIMARY KEY,
        instance_id text NOT NULL,
        kind text NOT NULL,
        at bigint NOT NULL,
        taken_by text,
        outcome text
    );
    CREATE INDEX commands_pending ON commands (instance_id, at) WHERE taken_by IS NULL;
    """,
    f"""
    -- Child workflows: the instance whose step.child started this one, and
    -- whether it is left running when that parent is terminated or restarted.
    ALTER TABLE instances ADD COLUMN parent_id text,
        ADD COLUMN abandon boolean NOT NULL DEFAULT false;
    -- ListInstances by parent, newest first; a parent's terminate finds its children.
    CREATE INDEX instances_by_parent ON instances (parent_id, pk) WHERE parent_id IS NOT NULL;
    DROP FUNCTION cruzflow_apply;
{_apply_function(_LINK_COLUMNS)}
    -- A child's end, told to its parent in the child's last commit, makes a
    -- waiting parent due in that commit: if no server wakes it (all were
    -- killed), the next to start does, through the wake index.
    CREATE FUNCTION cruzflow_child_ended() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE instances SET wake_at = NEW.at
        WHERE id = NEW.instance_id AND status = 4 AND wake_at > NEW.at;
        RETURN NULL;
    END $$;
    CREATE TRIGGER inbox_child_ended AFTER INSERT ON inbox FOR EACH ROW
        WHEN (NEW.type LIKE 'cruzflow:child:%') EXECUTE FUNCTION cruzflow_child_ended();
    """,
    f"""
    -- Concurrency and rate limits of a workflow ([[workflows]] concurrency,
    -- concurrency_key, rate_limit): the key whose slots an instance takes, and
    -- gate NULL (no limit), 0 (waiting for a slot) or 1 (let through at
    -- gated_at: it holds its slot until it finishes). One waiting is held by
    -- the lease epoch 0, which no server has: claim passes it over.
    ALTER TABLE instances ADD COLUMN priority integer NOT NULL DEFAULT 0,
        ADD COLUMN concurrency_key text, ADD COLUMN gate smallint, ADD COLUMN gated_at bigint;
    -- Who goes next: higher priority first, then creation order.
    CREATE INDEX instances_gate_waiting
        ON instances (workflow, concurrency_key, priority DESC, pk) WHERE gate = 0;
    -- Who holds a slot: counted, never a history scan.
    CREATE INDEX instances_gate_holding
        ON instances (workflow, concurrency_key) WHERE gate = 1 AND status NOT IN ({_FINISHED});
    -- Starts within a rate limit's window.
    CREATE INDEX instances_gate_starts
        ON instances (workflow, concurrency_key, gated_at) WHERE gate = 1;

    -- After cruzflow_apply, in its statement (so in its transaction): the new
    -- instances' gate columns, instances held at their gate again, then each
    -- (workflow, key) named opened as far as its limits allow. Openings of
    -- one workflow are serialized across servers by an advisory lock, taken
    -- in name order; the count each makes sees every opening committed
    -- before (each statement here reads afresh), so the servers together
    -- never let more through than the limit.
    CREATE FUNCTION cruzflow_gate(
        lease_owner text, lease_epoch bigint, now_ms bigint, skipped text[],
        n_id text[], n_priority integer[], n_key text[], n_gate smallint[],
        h_id text[],
        g_workflow text[], g_limit integer[], g_starts integer[], g_per bigint[],
        i_id text[], k_workflow text[], k_key text[], sweep boolean,
        OUT promoted text[], OUT retry_workflow text[], OUT retry_key text[],
        OUT retry_at bigint[]
    ) LANGUAGE plpgsql AS $$
    #variable_conflict use_column
    DECLARE
        flow text;
        k record;
        lim integer;
        st integer;
        per bigint;
        free integer;
        got text[];
        recent bigint[];
    BEGIN
        promoted := '{{}}'; retry_workflow := '{{}}'; retry_key := '{{}}'; retry_at := '{{}}';
        IF cardinality(n_id) > 0 THEN
            UPDATE instances i SET priority = n.priority, concurrency_key = n.key, gate = n.gate,
                owner = CASE WHEN n.gate = 0 THEN 'concurrency' ELSE i.owner END,
                epoch = CASE WHEN n.gate = 0 THEN 0 ELSE i.epoch END
            FROM unnest(n_id, n_priority, n_key, n_gate) AS n(id, priority, key, gate)
            WHERE i.id = n.id AND NOT (n.id = ANY(skipped));
        END IF;
        IF cardinality(h_id) > 0 THEN
            UPDATE instances i SET gate = 0, owner = 'concurrency', epoch = 0
            WHERE i.id = ANY(h_id) AND i.gate IS NOT NULL AND i.status = 1
              AND i.owner = lease_owner AND i.epoch = lease_epoch;
        END IF;
        FOR flow IN SELECT DISTINCT x FROM unnest(g_workflow) AS g(x) ORDER BY 1 LOOP
            PERFORM pg_advisory_xact_lock({_GATE_LOCK}, hashtext(flow));
        END LOOP;
        FOR k IN
            SELECT DISTINCT x.workflow, x.key FROM (
                SELECT i.workflow, i.concurrency_key FROM instances i
                WHERE i.id = ANY(i_id) AND i.gate IS NOT NULL
                UNION ALL SELECT * FROM unnest(k_workflow, k_key)
                UNION ALL SELECT i.workflow, i.concurrency_key FROM instances i
                WHERE sweep AND i.gate = 0 AND i.status = 1
            ) AS x(workflow, key) ORDER BY 1, 2
        LOOP
            lim := NULL; st := NULL; per := 0;
            SELECT g.lim, g.st, g.per INTO lim, st, per
              FROM unnest(g_workflow, g_limit, g_starts, g_per) AS g(flow, lim, st, per)
              WHERE g.flow = k.workflow;
            free := 2147483647;
            IF lim IS NOT NULL THEN
                free := lim - (SELECT count(*) FROM instances i
                    WHERE i.workflow = k.workflow AND i.concurrency_key = k.key AND i.gate = 1
                      AND i.status NOT IN ({_FINISHED}));
            END IF;
            recent := '{{}}';
            IF st IS NOT NULL THEN
                recent := ARRAY(SELECT i.gated_at FROM instances i
                    WHERE i.workflow = k.workflow AND i.concurrency_key = k.key AND i.gate = 1
                      AND i.gated_at > now_ms - per
                    ORDER BY i.gated_at DESC LIMIT st);
                free := least(free, st - cardinality(recent));
            END IF;
            got := '{{}}';
            IF free > 0 THEN
                WITH up AS (
                    UPDATE instances i SET gate = 1, gated_at = now_ms, owner = NULL, epoch = NULL
                    WHERE i.pk IN (
                        SELECT w.pk FROM instances w
                        WHERE w.workflow = k.workflow AND w.concurrency_key = k.key
                          AND w.gate = 0 AND w.status = 1
                        ORDER BY w.priority DESC, w.pk LIMIT free
                        FOR UPDATE SKIP LOCKED)
                    RETURNING i.id)
                SELECT coalesce(array_agg(up.id), '{{}}') INTO got FROM up;
                promoted := promoted || got;
            END IF;
            IF st IS NOT NULL AND cardinality(recent) + cardinality(got) >= st
               AND EXISTS (SELECT 1 FROM instances w
                   WHERE w.workflow = k.workflow AND w.concurrency_key = k.key
                     AND w.gate = 0 AND w.status = 1) THEN
                -- A start frees once the st-th newest start leaves the window.
                recent := array_fill(now_ms, ARRAY[cardinality(got)]) || recent;
                retry_workflow := retry_workflow || k.workflow;
                retry_key := retry_key || k.key;
                retry_at := retry_at || (recent[st] + per + 1);
            END IF;
        END LOOP;
        IF cardinality(promoted) > 0 THEN
            PERFORM cruzflow_notify(lease_epoch, ARRAY(
                SELECT json_build_array({int(NoticeKind.RUNNABLE)}, p, 0)::text
                FROM unnest(promoted) AS p));
        END IF;
    END $$;
    """,
    """
    -- Cron schedules (engine/schedules.py); cursor_at: every due time up to
    -- it is done with (fired, or passed over).
    CREATE TABLE schedules (
        id text PRIMARY KEY,
        workflow text NOT NULL,
        cron text NOT NULL,
        timezone text NOT NULL,
        params bytea NOT NULL,
        catch_up smallint NOT NULL,
        paused boolean NOT NULL,
        origin smallint NOT NULL,
        created_at bigint NOT NULL,
        updated_at bigint NOT NULL,
        cursor_at bigint NOT NULL,
        last_due_at bigint,
        last_instance_id text
    );
    -- The schedule that created an instance (set beside cruzflow_apply, in
    -- its transaction: see PostgresStore.apply), and ListInstances by it.
    ALTER TABLE instances ADD COLUMN schedule_id text;
    CREATE INDEX instances_by_schedule ON instances (schedule_id, pk)
        WHERE schedule_id IS NOT NULL;
    """,
    """
    -- The audited changes of an instance's steps (RepairInstance, a restart
    -- from a step): few rows, so GetStatus finds whether an instance has any
    -- with one probe of a small index, and reads them only then.
    CREATE INDEX events_audit ON events (instance_id, seq) WHERE kind = 6;
    """,
]

# The lease (2), the token, then one array per column: new instances (17),
# updates (10), cleared steps (1), steps (15), events (6), inbox (5), consumed
# marks (3), purges (2).
APPLY_ARGS = 62
_APPLY = (
    "SELECT conflicts, fenced, purged FROM cruzflow_apply("
    f"{', '.join(f'${n}' for n in range(1, APPLY_ARGS + 1))})"
)
# A batch that touches concurrency gates: cruzflow_gate after cruzflow_apply,
# in the same statement (one round trip, one transaction).
GATE_ARGS = 14
_APPLY_GATED = (
    "SELECT a.conflicts, a.fenced, a.purged, g.promoted, g.retry_workflow, g.retry_key,"
    f" g.retry_at FROM cruzflow_apply({', '.join(f'${n}' for n in range(1, APPLY_ARGS + 1))}) a"
    " CROSS JOIN LATERAL cruzflow_gate($1, $2, "
    f"${APPLY_ARGS + 1}, a.conflicts || a.fenced, "
    f"{', '.join(f'${n}' for n in range(APPLY_ARGS + 2, APPLY_ARGS + GATE_ARGS + 1))}) g"
)
# The claim functions return the first schema's columns; the parent link is
# joined on (it never changes, so the statement's snapshot of it is current),
# one index lookup per row (LIMIT keeps the planner from turning the LATERAL
# subquery into a join that reads the whole table).
_LINK = (
    " LEFT JOIN LATERAL (SELECT i.parent_id, i.abandon FROM instances i WHERE i.id = c.r_id"
    " LIMIT 1) l ON true"
)
_CLAIM = f"SELECT c.*, l.* FROM cruzflow_claim($1, $2, $3) c{_LINK}"
_CLAIM_ONE = f"SELECT c.*, l.* FROM cruzflow_claim_one($1, $2, $3) c{_LINK}"
_RELEASE = "SELECT cruzflow_release($1, $2)"
# A command and, in the same transaction, the notice to every server.
_SEND_COMMAND = (
    "WITH c AS (INSERT INTO commands (id, instance_id, kind, at) VALUES ($1, $2, $3, $4)"
    " RETURNING instance_id)"
    f" SELECT pg_notify('{CHANNEL}', json_build_object('from', 0, 'n',"
    f" json_build_array(json_build_array({int(NoticeKind.COMMAND)}, c.instance_id, 0)))::text)"
    " FROM c"
)
_PENDING_COMMANDS = (
    "SELECT id, instance_id, kind, at FROM commands"
    " WHERE instance_id = $1 AND taken_by IS NULL ORDER BY at"
)
_TAKE_COMMAND = (
    "UPDATE commands SET taken_by = $2, outcome = $3 WHERE id = $1 AND taken_by IS NULL"
    " RETURNING id"
)
_ANSWER_COMMAND = "UPDATE commands SET outcome = $2 WHERE id = $1"
_COMMAND_OUTCOME = "SELECT outcome FROM commands WHERE id = $1"
# A new lease; leases dead for a day that hold nothing go (an instance row
# always names a lease that has a row).
_ACQUIRE = (
    "WITH gone AS (DELETE FROM servers s WHERE s.expires_at < clock_timestamp() - interval '1 day'"
    " AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.epoch = s.epoch))"
    " INSERT INTO servers (owner, expires_at)"
    " VALUES ($1, clock_timestamp() + make_interval(secs => $2)) RETURNING epoch"
)
_RENEW = (
    "UPDATE servers SET expires_at = clock_timestamp() + make_interval(secs => $3)"
    " WHERE epoch = $2 AND owner = $1 AND expires_at > clock_timestamp() RETURNING epoch"
)

_INSTANCE_COLUMNS = (
    f"{_prefixed('i')}, {_LAST_SEQ.format('i')}, i.parent_id, i.abandon, i.priority,"
    " i.concurrency_key, i.gate, i.schedule_id"
)
# Only for the new instances a schedule created, and only those inserted
# (a taken id, $3, keeps its row as it was).
_SET_SCHEDULE = (
    "UPDATE instances i SET schedule_id = s.schedule_id"
    " FROM unnest($1::text[], $2::text[]) AS s(id, schedule_id)"
    " WHERE i.id = s.id AND NOT (s.id = ANY($3::text[]))"
)
_SCHEDULE_COLUMNS = (
    "id, workflow, cron, timezone, params, catch_up, paused, origin, created_at, updated_at,"
    " cursor_at, last_due_at, last_instance_id"
)
_GET_INSTANCE = (
    f"SELECT {_INSTANCE_COLUMNS}, EXISTS (SELECT 1 FROM events e"
    " WHERE e.instance_id = i.id AND e.kind = 6) FROM instances i WHERE i.id = $1"
)
# The audit entries (EventKind.REPAIRED), newest first (reversed by the caller).
_READ_AUDIT = (
    "SELECT instance_id, seq, at, kind, data::text, payload FROM events"
    " WHERE instance_id = $1 AND kind = 6 ORDER BY seq DESC LIMIT $2"
)
_COUNT_UNFINISHED = (
    "SELECT status, count(*) FROM instances"
    f" WHERE status IN ({', '.join(str(int(s)) for s in UNFINISHED)}) GROUP BY status"
)
_GET_STEPS = (
    "SELECT instance_id, idx, name, occurrence, status, attempts, started_at, ended_at, output,"
    " error_name, error_message, next_attempt_at, kind, event_type, error_traceback"
    " FROM steps WHERE instance_id = $1 ORDER BY idx"
)
_READ_EVENTS = (
    "SELECT instance_id, seq, at, kind, data::text, payload FROM events"
    " WHERE instance_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
)
_GET_INSTANCES = _GET_INSTANCE.replace("WHERE i.id = $1", "WHERE i.id = ANY($1::text[])")
# Up to $3 events after each cursor, in cursor order: a range of the events'
# primary key per cursor; the sort is of those few rows only.
_READ_EVENTS_MANY = (
    "SELECT x.instance_id, x.seq, x.at, x.kind, x.data, x.payload"
    " FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS c(id, after, pos)"
    " CROSS JOIN LATERAL (SELECT e.instance_id, e.seq, e.at, e.kind, e.data::text AS data,"
    " e.payload FROM events e WHERE e.instance_id = c.id AND e.seq > c.after"
    " ORDER BY e.seq LIMIT $3) x ORDER BY c.pos, x.seq"
)
_TAKE_INBOX = (
    "SELECT id, instance_id, type, payload, at, trace_parent FROM inbox"
    " WHERE instance_id = $1 AND type = $2 AND consumed_by IS NULL ORDER BY id LIMIT $3"
)
# starts_with, not a range: the database's collation may not order text by code point.
_PENDING_TYPES = (
    "SELECT type FROM inbox"
    " WHERE instance_id = $1 AND consumed_by IS NULL AND starts_with(type, $2)"
)
_DUE_WAKES = (
    "SELECT id, wake_at FROM instances WHERE wake_at IS NOT NULL AND wake_at <= $1"
    " ORDER BY wake_at LIMIT $2"
)
_ENDED_BEFORE = (
    "SELECT id FROM instances WHERE ended_at IS NOT NULL AND ended_at < $1"
    " ORDER BY ended_at LIMIT $2"
)

# ---- listing: newest first, keyset-paginated on pk (creation order).
_FAR = 2**63 - 1
# The first position from which instances were created at or after $1 (ms): a
# bisection over the primary key, ~log2(rows) index lookups in one statement
# (see sqlite.py: pk order is creation order while the clock does not step
# back; the page query still filters on created_at itself).
_CREATED_FROM = (
    "(SELECT c.created_at FROM instances c WHERE c.pk >= (b.lo + b.hi) / 2 ORDER BY c.pk LIMIT 1)"
)
_POSITION_AT = (
    "WITH RECURSIVE bisect(lo, hi) AS ("
    " SELECT 0::bigint, (SELECT COALESCE(max(pk), 0) FROM instances) + 1"
    " UNION ALL"
    " SELECT CASE WHEN x.below THEN b.lo ELSE (b.lo + b.hi) / 2 + 1 END,"
    " CASE WHEN x.below THEN (b.lo + b.hi) / 2 ELSE b.hi END"
    f" FROM bisect b, LATERAL (SELECT COALESCE({_CREATED_FROM} >= $1, true) AS below) x"
    " WHERE b.lo < b.hi"
    ") SELECT min(hi) FROM bisect"
)
_CLOCK_SLACK_MS = 10_000
_LIVE_STATUSES = frozenset(int(s) for s in UNFINISHED)


def _page_query(
    query: InstanceQuery, low: int, high: int, limit: int
) -> tuple[str, tuple[Any, ...]]:
    """The page statement for ``query`` over positions [low, high): the shapes
    of sqlite.py's, each an index walk backwards from ``high``."""
    args: list[Any] = [
        low,
        high,
        -_FAR if query.created_min is None else query.created_min,
        _FAR if query.created_max is None else query.created_max,
        limit,
    ]
    bounds = " AND i.pk >= $1 AND i.pk < $2 AND i.created_at >= $3 AND i.created_at < $4"
    tail = " ORDER BY 1 DESC LIMIT $5"

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    statuses = sorted({int(s) for s in query.statuses})

    def status_in() -> str:
        return f" AND i.status = ANY({arg(statuses)}::smallint[])" if statuses else ""

    by_workflow = f" AND i.workflow = {arg(query.workflow)}" if query.workflow is not None else ""
    select = f"SELECT i.pk, {_INSTANCE_COLUMNS} FROM instances i"
    by_parent = f" AND i.parent_id = {arg(query.parent_id)}" if query.parent_id is not None else ""
    by_schedule = (
        f" AND i.schedule_id = {arg(query.schedule_id)}" if query.schedule_id is not None else ""
    )
    if query.lookup_key is not None:
        where = (
            f"i.lookup_key = {arg(query.lookup_key)}{by_parent}{by_schedule}{by_workflow}"
            f"{status_in()}"
        )
        return f"{select} WHERE {where}{bounds}{tail}", tuple(args)
    if query.schedule_id is not None:
        where = f"true{by_schedule}{by_parent}{by_workflow}{status_in()}"
        return f"{select} WHERE {where}{bounds}{tail}", tuple(args)
    if query.parent_id is not None:
        return f"{select} WHERE true{by_parent}{by_workflow}{status_in()}{bounds}{tail}", tuple(
            args
        )
    if statuses and (query.workflow is None or all(s in _LIVE_STATUSES for s in statuses)):
        # One index range per status, merged in pk order.
        arms = [f"{select} WHERE i.status = {s}{by_workflow}{bounds}" for s in statuses]
        if len(arms) == 1:
            return arms[0] + tail, tuple(args)
        return " UNION ALL ".join(f"({arm}{tail})" for arm in arms) + tail, tuple(args)
    if query.workflow is not None:
        return f"{select} WHERE true{by_workflow}{status_in()}{bounds}{tail}", tuple(args)
    return f"{select} WHERE true{bounds}{tail}", tuple(args)


def _count_query(query: InstanceQuery, low: int, high: int) -> tuple[str, tuple[Any, ...]]:
    """The count statement for ``query`` over positions [low, high) (used only
    with a time filter), in the shapes of sqlite.py's. Unlike SQLite, no index
    of workflow and status: PostgreSQL's (parallel) scan counted 100,000
    instances in 14 ms, and an index would take a new entry at every status
    update."""
    where: list[str] = []
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if query.lookup_key is not None:
        where.append(f"lookup_key = {arg(query.lookup_key)}")
    if query.workflow is not None:
        where.append(f"workflow = {arg(query.workflow)}")
    if query.created_min is not None or query.created_max is not None:
        created_min = -_FAR if query.created_min is None else query.created_min
        created_max = _FAR if query.created_max is None else query.created_max
        where.append(
            f"pk >= {arg(low)} AND pk < {arg(high)}"
            f" AND created_at >= {arg(created_min)} AND created_at < {arg(created_max)}"
        )
    sql = (
        "SELECT workflow, status, count(*) FROM instances"
        f" WHERE {' AND '.join(where) or 'true'} GROUP BY workflow, status"
    )
    return sql, tuple(args)


# The statements on the hot path, for the query-plan test (their arguments).
HOT_QUERIES: dict[str, tuple[str, tuple[Any, ...]]] = {
    "get_instance": (_GET_INSTANCE, ("x",)),
    "get_steps": (_GET_STEPS, ("x",)),
    "read_events": (_READ_EVENTS, ("x", 0, 10)),
    "get_instances": (_GET_INSTANCES, (["x", "y"],)),
    "read_events_many": (_READ_EVENTS_MANY, (["x", "y"], [0, 3], 10)),
    "read_audit": (_READ_AUDIT, ("x", 10)),
    "take_inbox": (_TAKE_INBOX, ("x", "t", 1)),
    "due_wakes": (_DUE_WAKES, (0, 10)),
    "pending_types": (_PENDING_TYPES, ("x", "p:")),
    "count_unfinished": (_COUNT_UNFINISHED, ()),
    "list_all": _page_query(InstanceQuery(), 0, 10, 10),
    "list_by_workflow": _page_query(
        InstanceQuery(workflow="w", statuses=(InstanceStatus.COMPLETE,), created_min=1), 0, 10, 10
    ),
    "list_by_statuses": _page_query(
        InstanceQuery(statuses=(InstanceStatus.RUNNING, InstanceStatus.COMPLETE)), 0, 10, 10
    ),
    "list_by_live_statuses_of_workflow": _page_query(
        InstanceQuery(workflow="w", statuses=(InstanceStatus.QUEUED, InstanceStatus.RUNNING)),
        0,
        10,
        10,
    ),
    "list_by_lookup": _page_query(
        InstanceQuery(workflow="w", lookup_key="k", statuses=(InstanceStatus.RUNNING,)), 0, 10, 10
    ),
    "list_by_parent": _page_query(
        InstanceQuery(parent_id="p", statuses=(InstanceStatus.COMPLETE,)), 0, 10, 10
    ),
    "list_by_schedule": _page_query(InstanceQuery(schedule_id="s"), 0, 10, 10),
    "position_at": (_POSITION_AT, (0,)),
    "ended_before": (_ENDED_BEFORE, (0, 10)),
}


# ---- faults
# What a failure is, by SQLSTATE (exact, else its class): the cause in a few
# words, whether nothing was applied and the same write may succeed once the
# fault is mended (transient), and what mends it.
_FAULTS: dict[str, tuple[str, bool, str]] = {
    "08": (
        "connection lost",
        True,
        "check that PostgreSQL runs and that this machine reaches it",
    ),
    "57P01": ("database shut down", True, "start PostgreSQL again"),
    "57P02": ("database crashed", True, "PostgreSQL restarts by itself; check its log"),
    "57P03": (
        "database starting up or shutting down",
        True,
        "wait for PostgreSQL to accept connections",
    ),
    "53300": (
        "too many connections",
        True,
        "raise max_connections of PostgreSQL, or run fewer servers or smaller pools",
    ),
    "53100": ("disk full", True, "free space on the disk of PostgreSQL"),
    "53200": ("out of memory", True, "free memory on the machine of PostgreSQL"),
    "53": ("insufficient resources", True, "check the resources of PostgreSQL"),
    "40001": ("serialization failure", True, "none needed: the write is tried again"),
    "40P01": ("deadlock", True, "none needed: the write is tried again"),
    "40": ("transaction rolled back", True, "none needed: the write is tried again"),
    "25006": (
        "read-only",
        True,
        "the database accepts no writes (a standby, or default_transaction_read_only); "
        "point the url at the primary",
    ),
    "55P03": ("lock timeout", True, "end the transaction that holds the lock"),
    "57014": ("statement cancelled", True, "check statement_timeout and who cancels queries"),
    "58": ("I/O error", True, "check the disks of PostgreSQL"),
    "28P01": (
        "authentication failed",
        False,
        "check the user and password in the url (or PGPASSWORD, or ~/.pgpass)",
    ),
    "28": (
        "connection refused by the server's rules",
        False,
        "check pg_hba.conf of PostgreSQL, the user and the database name",
    ),
    "3D000": (
        "no such database",
        False,
        "check the database name in the url, or create the database (createdb)",
    ),
    "42501": ("permission denied", False, "grant the url's user rights on the database"),
}


def redact_url(url: str) -> str:
    """``url`` with its password shown as ``***``, for messages and logs."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "(a URL that cannot be parsed)"
    netloc = parts.netloc
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hosts}"
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        if any(k in ("password", "sslpassword") for k, _ in pairs):
            query = "&".join(
                f"{k}=***" if k in ("password", "sslpassword") else f"{k}={urllib.parse.quote(v)}"
                for k, v in pairs
            )
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def _secrets_of(url: str) -> list[str]:
    """The secrets in ``url`` as they could appear in text, longest first."""
    try:
        parts = urllib.parse.urlsplit(url)
        found = [parts.password or ""]
        found += [
            v
            for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
            if k in ("password", "sslpassword")
        ]
    except ValueError:
        return []
    out = set()
    for secret in found:
        if secret:
            out |= {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote(secret)}
    return sorted(out, key=len, reverse=True)


def _transpose(rows: list[tuple[Any, ...]], width: int) -> list[Any]:
    """Rows as one list per column: the arrays cruzflow_apply takes."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows, strict=True)]


def _apply_args(lease: Lease, token: uuid.UUID, batch: Batch) -> list[Any]:
    dumps = json.dumps
    return [
        lease.owner,
        lease.epoch,
        token,
        *_transpose(
            [
                (r.id, r.workflow, int(r.status), r.params, r.output, r.error_name,
                 r.error_message, r.created_at, r.updated_at, r.ended_at, r.lookup_key,
                 r.wake_at, r.trace_parent, r.error_traceback, r.run_started_at, r.parent_id,
                 r.abandon)
                for r in batch.new_instances
            ],
            17,
        ),
        *_transpose(
            [
                (u.id, int(u.status), u.updated_at, u.output, u.error_name, u.error_message,
                 u.ended_at, u.wake_at, u.error_traceback, u.run_started_at)
                for u in batch.instance_updates.values()
            ],
            10,
        ),
        sorted(batch.cleared_steps),
        *_transpose(
            [
                (s.instance_id, s.index, s.name, s.occurrence, int(s.status), s.attempts,
                 s.started_at, s.ended_at, s.output, s.error_name, s.error_message,
                 s.next_attempt_at, int(s.kind), s.event_type, s.error_traceback)
                for s in batch.steps.values()
            ],
            15,
        ),
        *_transpose(
            [
                (e.instance_id, e.seq, e.at, int(e.kind), dumps(e.data, separators=(",", ":")),
                 e.payload)
                for e in batch.events
            ],
            6,
        ),
        *_transpose(
            [(e.instance_id, e.type, e.payload, e.at, e.trace_parent) for e in batch.inbox], 5
        ),
        *_transpose(
            [(event, instance, step) for event, (instance, step) in batch.consumed.items()], 3
        ),
        *_transpose(sorted(batch.purge.items()), 2),
    ]  # fmt: skip


def _gated(batch: Batch) -> bool:
    """Whether the batch touches concurrency gates (or sets a priority)."""
    return bool(
        batch.gate_ids
        or batch.gate_keys
        or batch.gate_sweep
        or batch.gate_hold
        or any(r.gate is not None or r.priority for r in batch.new_instances)
    )


def _gate_args(batch: Batch) -> list[Any]:
    now = int(time.time() * 1000)
    new = [r for r in batch.new_instances if r.gate is not None or r.priority]
    gates = sorted(batch.gates.items())
    return [
        now,
        *_transpose([(r.id, r.priority, r.concurrency_key, r.gate) for r in new], 4),
        sorted(batch.gate_hold),
        *_transpose([(w, g.limit, g.starts, g.per_ms) for w, g in gates], 4),
        sorted(batch.gate_ids),
        *_transpose(sorted(batch.gate_keys), 2),
        batch.gate_sweep,
    ]


async def _no_reset(conn: asyncpg.Connection) -> None:
    """A connection goes back to the pool as it is: every statement of this
    store is its own transaction and sets nothing, so the default reset would
    only cost a round trip per use."""


class PostgresStore:
    """The ``Store`` on a PostgreSQL database that several servers share."""

    def __init__(
        self,
        url: str,
        *,
        lease_period_s: float = 5.0,
        pool_size: int = 10,
        connect_timeout_s: float = 10.0,
    ) -> None:
        self._url = url
        self.url = redact_url(url)
        """The URL with its password shown as ``***``: what messages name."""
        self._secrets = _secrets_of(url)
        self._lease_period_s = lease_period_s
        self._pool_size = pool_size
        self._connect_timeout_s = connect_timeout_s
        self._pool: asyncpg.Pool | None = None
        self._page_token_key: bytes | None = None
        # The leases acquired through this store: their notices are its own.
        self._epochs: set[int] = set()
        self._listeners: list[Callable[[list[Notice]], None]] = []
        self._listening: asyncio.Task[None] | None = None
        # Set while the listening connection is up (tests wait for it).
        self.listening = asyncio.Event()
        # Batches whose last try failed with its outcome unknown, and the token
        # they were sent with: a retry sends the same, and the database tells
        # it was applied already.
        self._tokens: dict[int, tuple[Batch, uuid.UUID]] = {}

    def __repr__(self) -> str:
        return f"PostgresStore({self.url!r})"

    # ------------------------------------------------------------ lifecycle
    def _connect_args(self) -> dict[str, Any]:
        settings = {"synchronous_commit": "on"}  # durable commits, whatever the URL says
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self._url).query)
        if "application_name" not in query:
            settings["application_name"] = "cruzflow"
        return {"timeout": self._connect_timeout_s, "server_settings": settings}

    async def open(self) -> None:
        try:
            conn = await asyncpg.connect(self._url, **self._connect_args())
        except Exception as exc:
            if not _is_fault(exc):
                # A URL asyncpg cannot use: its text may quote the URL, so only
                # what kind of error it was is shown.
                raise StoreError(
                    f"{self.url}: cannot connect: {type(exc).__name__}; check the url's form: "
                    f"postgresql://user:password@host:5432/database",
                    cause="bad url",
                ) from None
            raise self._fault("cannot connect", exc) from None
        try:
            await self._migrate(conn)
            self._page_token_key = await self._secret(conn, "page_token_key")
        except Exception as exc:
            if not _is_fault(exc):
                raise
            raise self._fault("cannot migrate the store", exc) from None
        finally:
            with contextlib.suppress(Exception):
                await conn.close()
        try:
            self._pool = await asyncpg.create_pool(
                self._url,
                min_size=1,
                max_size=self._pool_size,
                reset=_no_reset,
                **self._connect_args(),
            )
        except Exception as exc:
            raise self._fault("cannot connect", exc) from None

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        try:
            await conn.execute("CREATE TABLE IF NOT EXISTS cruzflow_schema (version integer)")
            version = await conn.fetchval("SELECT max(version) FROM cruzflow_schema") or 0
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"{self.url}: schema version {version} is newer than this server knows "
                    f"({len(MIGRATIONS)}); run a newer cruzflow"
                )
            for number in range(version, len(MIGRATIONS)):
                async with conn.transaction():
                    await conn.execute(MIGRATIONS[number])
                    await conn.execute("DELETE FROM cruzflow_schema")
                    await conn.execute("INSERT INTO cruzflow_schema VALUES ($1)", number + 1)
                log.info("store %s migrated to schema version %d", self.url, number + 1)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)

    async def _secret(self, conn: asyncpg.Connection, name: str) -> bytes:
        """The 32 random bytes stored under ``name``, made by the first server."""
        await conn.execute(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
            name,
            secrets.token_bytes(32),
        )
        value: bytes = await conn.fetchval("SELECT value FROM meta WHERE key = $1", name)
        return value

    def page_token_key(self) -> bytes:
        assert self._page_token_key is not None, "store is not open"
        return self._page_token_key

    async def close(self) -> None:
        task, self._listening = self._listening, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pool.terminate()
        self._tokens.clear()

    # --------------------------------------------------------------- faults
    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _fault(self, what: str, exc: BaseException) -> StoreError:
        """A StoreError naming the cause of ``exc`` and what mends it; never the
        password."""
        cause, transient, hint = _classify(exc)
        detail = self._scrub(str(exc).strip() or type(exc).__name__)
        return StoreError(
            f"{self.url}: {what}: {cause} ({detail}); {hint}", cause=cause, transient=transient
        )

    def _pool_or_fail(self) -> asyncpg.Pool:
        pool = self._pool
        if pool is None:
            raise StoreError(f"{self.url}: the store is not open", cause="not open")
        return pool

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        try:
            async with self._pool_or_fail().acquire() as conn:
                rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
                return rows
        except StoreError:
            raise
        except Exception as exc:
            if not _is_fault(exc):
                raise
            raise self._fault("query failed", exc) from exc

    # ------------------------------------------------------------ ownership
    @property
    def lease_period_s(self) -> float | None:
        return self._lease_period_s

    async def acquire(self, owner: str) -> Lease:
        rows = await self._fetch(_ACQUIRE, owner, self._lease_period_s)
        epoch = int(rows[0][0])
        self._epochs.add(epoch)
        return Lease(owner, epoch)

    async def renew(self, lease: Lease) -> bool:
        rows = await self._fetch(_RENEW, lease.owner, lease.epoch, self._lease_period_s)
        return bool(rows)

    async def release(self, lease: Lease) -> None:
        await self._fetch(_RELEASE, lease.owner, lease.epoch)

    async def claim(self, lease: Lease, limit: int) -> list[InstanceRecord]:
        rows = await self._fetch(_CLAIM, lease.owner, lease.epoch, limit)
        return [instance_of(r) for r in rows]

    async def claim_one(self, lease: Lease, instance_id: str) -> InstanceRecord | None:
        rows = await self._fetch(_CLAIM_ONE, lease.owner, lease.epoch, instance_id)
        if not rows:
            return None
        row = rows[0]
        if row[0] == "held":
            raise StoreError(
                f"instance {instance_id!r} is run by another server ({row[1]}), whose lease "
                f"is alive; ask again later, or there",
                cause=HELD_ELSEWHERE,
            )
        if row[0] == "lost":
            raise StoreError(
                f"{self.url}: this server's lease ({lease.owner}, epoch {lease.epoch}) was "
                f"lost: it expired without renewal, and other servers may run its instances",
                cause="lease lost",
            )
        return instance_of(row[2:])

    # ---------------------------------------------------------------- write
    async def apply(self, batch: Batch, lease: Lease) -> dict[str, Refusal]:
        """The whole batch as one statement (one round trip, one commit):
        cruzflow_apply fences each instance by ``lease``, refuses taken ids,
        and notifies the other servers in the same transaction.

        When the connection is lost after the statement was sent, whether it
        committed is unknown: the batch is retried with the same token, and
        the lease's row tells whether it landed, so it lands once.
        """
        if not batch:
            return {}
        key = id(batch)
        known = self._tokens.get(key)
        token = known[1] if known is not None and known[0] is batch else uuid.uuid4()
        self._tokens[key] = (batch, token)
        args = _apply_args(lease, token, batch)
        gated = _gated(batch)
        if gated:
            args += _gate_args(batch)
        try:
            # Only the instances a schedule created take the longer way.
            scheduled = [r for r in batch.new_instances if r.schedule_id]
            row = await (
                self._call_apply_scheduled(args, scheduled) if scheduled else self._call_apply(args)
            )
        except Exception as exc:
            if not _is_fault(exc):
                self._tokens.pop(key, None)
                raise
            fault = self._fault("commit failed", exc)
            if not fault.transient:
                self._tokens.pop(key, None)
            raise fault from exc
        self._tokens.pop(key, None)
        batch.purged = row[2]
        if gated:
            batch.promoted = list(row[3])
            batch.gate_retry = list(zip(row[4], row[5], row[6], strict=True))
        refused = dict.fromkeys(row[0], Refusal.CONFLICT)
        refused.update(dict.fromkeys(row[1], Refusal.FENCED))
        return refused

    async def _call_apply(self, args: list[Any]) -> asyncpg.Record:
        # The arguments of cruzflow_gate follow those of cruzflow_apply, if any.
        sql = _APPLY_GATED if len(args) > APPLY_ARGS else _APPLY
        async with self._pool_or_fail().acquire() as conn:
            row: asyncpg.Record = await conn.fetchrow(sql, *args)
            return row

    async def _call_apply_scheduled(
        self, args: list[Any], scheduled: list[InstanceRecord]
    ) -> asyncpg.Record:
        """The batch, and the schedule id of its instances a schedule created,
        in one transaction (a retry of a batch that landed sets it again)."""
        sql = _APPLY_GATED if len(args) > APPLY_ARGS else _APPLY
        async with self._pool_or_fail().acquire() as conn, conn.transaction():
            row: asyncpg.Record = await conn.fetchrow(sql, *args)
            await conn.execute(
                _SET_SCHEDULE,
                [r.id for r in scheduled],
                [r.schedule_id for r in scheduled],
                list(row[0]) + list(row[1]),
            )
            return row

    # ------------------------------------------------------------ commands
    async def send_command(self, command: Command) -> None:
        await self._fetch(_SEND_COMMAND, command.id, command.instance_id, command.kind, command.at)

    async def pending_commands(self, instance_id: str) -> list[Command]:
        rows = await self._fetch(_PENDING_COMMANDS, instance_id)
        return [Command(r[0], r[1], r[2], r[3]) for r in rows]

    async def take_command(self, command_id: str, taker: str) -> bool:
        outcome = ABANDONED if taker == ABANDONED else None
        return bool(await self._fetch(_TAKE_COMMAND, command_id, taker, outcome))

    async def answer_command(self, command_id: str, outcome: str) -> None:
        await self._fetch(_ANSWER_COMMAND, command_id, outcome)

    async def command_outcome(self, command_id: str) -> str | None:
        rows = await self._fetch(_COMMAND_OUTCOME, command_id)
        return rows[0][0] if rows else None

    # --------------------------------------------------------- notification
    def subscribe(self, listener: Callable[[list[Notice]], None]) -> None:
        self._listeners.append(listener)
        if self._listening is None:
            self._listening = asyncio.get_running_loop().create_task(
                self._listen(), name="cruzflow-store-listen"
            )

    async def _listen(self) -> None:
        """LISTEN on a connection of its own, and again after it is lost: what
        was sent meanwhile is not heard (a latency, never a lost event)."""
        delay = 0.05
        failing = False
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._url, **self._connect_args())
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._heard)
                self.listening.set()
                if failing:
                    log.warning("store %s: listening for other servers' changes again", self.url)
                failing = False
                delay = 0.05
                while not lost.is_set() and not conn.is_closed():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), 5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    log.warning(
                        "store %s: cannot listen for other servers' changes (%s); "
                        "trying again, they are read from the store meanwhile",
                        self.url,
                        self._fault("listen failed", exc),
                    )
                failing = True
            finally:
                self.listening.clear()
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _heard(self, conn: object, pid: int, channel: str, payload: str) -> None:
        try:
            message = json.loads(payload)
            if message["from"] in self._epochs:
                return  # this store's own commits: its engine knows them
            notices = [Notice(str(i), NoticeKind(k), int(seq)) for k, i, seq in message["n"]]
        except (ValueError, KeyError, TypeError):
            log.warning("store %s: a notification that is not cruzflow's ignored", self.url)
            return
        for listener in self._listeners:
            try:
                listener(notices)
            except Exception:  # a listener's bug must not stop the others
                log.exception("store notice listener failed")

    # ----------------------------------------------------------------- read
    async def get_instance(self, instance_id: str) -> InstanceRecord | None:
        rows = await self._fetch(_GET_INSTANCE, instance_id)
        if not rows:
            return None
        record = instance_of(tuple(rows[0])[:-1])
        record.audited = bool(rows[0][-1])
        return record

    async def get_instances(self, instance_ids: Sequence[str]) -> dict[str, InstanceRecord]:
        assert len(instance_ids) <= READ_BATCH
        if not instance_ids:
            return {}
        found = {}
        for row in await self._fetch(_GET_INSTANCES, list(instance_ids)):
            record = instance_of(tuple(row)[:-1])
            record.audited = bool(row[-1])
            found[record.id] = record
        return found

    async def read_events_many(
        self, cursors: Sequence[tuple[str, int]], limit_each: int
    ) -> list[EventRecord]:
        assert len(cursors) <= READ_BATCH
        if not cursors:
            return []
        ids = [instance_id for instance_id, _ in cursors]
        afters = [after_seq for _, after_seq in cursors]
        rows = await self._fetch(_READ_EVENTS_MANY, ids, afters, limit_each)
        return [event_of(r) for r in rows]

    async def read_audit(self, instance_id: str, limit: int) -> list[EventRecord]:
        rows = await self._fetch(_READ_AUDIT, instance_id, limit)
        return [event_of(r) for r in reversed(rows)]

    async def count_unfinished(self) -> dict[InstanceStatus, int]:
        rows = await self._fetch(_COUNT_UNFINISHED)
        return {InstanceStatus(r[0]): r[1] for r in rows}

    async def get_steps(self, instance_id: str) -> list[StepRecord]:
        rows = await self._fetch(_GET_STEPS, instance_id)
        return [step_of(r) for r in rows]

    async def read_events(self, instance_id: str, after_seq: int, limit: int) -> list[EventRecord]:
        rows = await self._fetch(_READ_EVENTS, instance_id, after_seq, limit)
        return [event_of(r) for r in rows]

    async def take_events(self, instance_id: str, type: str, limit: int) -> list[InboxEvent]:
        rows = await self._fetch(_TAKE_INBOX, instance_id, type, limit)
        return [inbox_of(r) for r in rows]

    async def pending_types(self, instance_id: str, prefix: str) -> list[str]:
        rows = await self._fetch(_PENDING_TYPES, instance_id, prefix)
        return [r[0] for r in rows]

    async def due_wakes(self, before: int, limit: int) -> list[tuple[str, int]]:
        rows = await self._fetch(_DUE_WAKES, before, limit)
        return [(r[0], r[1]) for r in rows]

    async def list_instances(
        self, query: InstanceQuery, limit: int
    ) -> list[tuple[int, InstanceRecord]]:
        low, high = await self._positions(
            query, _FAR if query.older_than is None else query.older_than
        )
        if low >= high:
            return []
        sql, args = _page_query(query, low, high, limit)
        rows = await self._fetch(sql, *args)
        return [(r[0], instance_of(r[1:])) for r in rows]

    async def count_instances(self, query: InstanceQuery) -> list[tuple[str, InstanceStatus, int]]:
        low, high = await self._positions(query, _FAR)
        if low >= high:
            return []
        sql, args = _count_query(query, low, high)
        rows = await self._fetch(sql, *args)
        return [(r[0], InstanceStatus(r[1]), r[2]) for r in rows]

    async def _positions(self, query: InstanceQuery, high: int) -> tuple[int, int]:
        """The positions [low, high) that may hold instances of ``query``'s
        creation times, at most ``high``."""
        low = 0
        if query.created_min is not None:
            low = await self._position_at(query.created_min - _CLOCK_SLACK_MS)
        if query.created_max is not None:
            high = min(high, await self._position_at(query.created_max + _CLOCK_SLACK_MS))
        return low, high

    async def _position_at(self, at: int) -> int:
        rows = await self._fetch(_POSITION_AT, at)
        return int(rows[0][0])

    async def ended_before(self, before: int, limit: int) -> list[str]:
        rows = await self._fetch(_ENDED_BEFORE, before, limit)
        return [r[0] for r in rows]

    # ------------------------------------------------------------ schedules
    async def put_schedule(self, schedule: ScheduleRecord, *, replace: bool = False) -> bool:
        s = schedule
        conflict = (
            " ON CONFLICT (id) DO UPDATE SET workflow = excluded.workflow,"
            " cron = excluded.cron, timezone = excluded.timezone, params = excluded.params,"
            " catch_up = excluded.catch_up, origin = excluded.origin,"
            " updated_at = excluded.updated_at"
            if replace
            else " ON CONFLICT (id) DO NOTHING"
        )
        rows = await self._fetch(
            f"INSERT INTO schedules ({_SCHEDULE_COLUMNS}) VALUES"
            f" ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13){conflict} RETURNING id",
            s.id, s.workflow, s.cron, s.timezone, s.params, int(s.catch_up), s.paused,
            int(s.origin), s.created_at, s.updated_at, s.cursor_at, s.last_due_at,
            s.last_instance_id,
        )  # fmt: skip
        return bool(rows)

    async def drop_config_schedules(self, keep: list[str]) -> list[str]:
        rows = await self._fetch(
            "DELETE FROM schedules WHERE origin = $1 AND NOT (id = ANY($2::text[])) RETURNING id",
            int(ScheduleOrigin.CONFIG),
            keep,
        )
        return [r[0] for r in rows]

    async def get_schedule(self, schedule_id: str) -> ScheduleRecord | None:
        rows = await self._fetch(
            f"SELECT {_SCHEDULE_COLUMNS} FROM schedules WHERE id = $1", schedule_id
        )
        return schedule_of(rows[0]) if rows else None

    async def list_schedules(
        self, workflow: str | None, after: str, limit: int
    ) -> list[ScheduleRecord]:
        rows = await self._fetch(
            f'SELECT {_SCHEDULE_COLUMNS} FROM schedules WHERE id COLLATE "C" > $1'
            ' AND ($2::text IS NULL OR workflow = $2) ORDER BY id COLLATE "C" LIMIT $3',
            after,
            workflow,
            limit,
        )
        return [schedule_of(r) for r in rows]

    async def pause_schedule(self, schedule_id: str, paused: bool, at: int) -> bool:
        # Resuming moves the cursor to now: what passed while paused is not caught up.
        rows = await self._fetch(
            "UPDATE schedules SET paused = $2, updated_at = $3,"
            " cursor_at = CASE WHEN $2 THEN cursor_at ELSE greatest(cursor_at, $3) END"
            " WHERE id = $1 RETURNING id",
            schedule_id,
            paused,
            at,
        )
        return bool(rows)

    async def delete_schedule(self, schedule_id: str) -> bool:
        rows = await self._fetch("DELETE FROM schedules WHERE id = $1 RETURNING id", schedule_id)
        return bool(rows)

    async def mark_schedule(
        self, schedule_id: str, cursor_at: int, instance_id: str | None = None
    ) -> None:
        await self._fetch(
            "UPDATE schedules SET cursor_at = greatest(cursor_at, $2),"
            " last_due_at = CASE WHEN $3::text IS NOT NULL AND $2 > coalesce(last_due_at, -1)"
            " THEN $2 ELSE last_due_at END,"
            " last_instance_id = CASE WHEN $3::text IS NOT NULL"
            " AND $2 > coalesce(last_due_at, -1) THEN $3 ELSE last_instance_id END"
            " WHERE id = $1",
            schedule_id,
            cursor_at,
            instance_id,
        )


def _is_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is the database's or the connection's doing (a StoreError),
    rather than a bug of this module."""
    if isinstance(exc, asyncpg.InterfaceError):
        return _closed(exc)
    return isinstance(exc, asyncpg.PostgresError | OSError | TimeoutError | EOFError)


def _closed(exc: asyncpg.InterfaceError) -> bool:
    """Whether asyncpg refused because the connection is closed (not misuse)."""
    return "closed" in str(exc)


def _classify(exc: BaseException) -> tuple[str, bool, str]:
    """(cause, transient, advice) of a failure."""
    state = getattr(exc, "sqlstate", None)
    if isinstance(exc, asyncpg.PostgresError) and isinstance(state, str):
        known = _FAULTS.get(state) or _FAULTS.get(state[:2])
        if known is not None:
            return known
        return ("database error", False, "see the database's message")
    if isinstance(exc, socket.gaierror):
        return ("host not found", True, "check the host name in the url and this machine's DNS")
    if isinstance(exc, ConnectionRefusedError):
        return (
            "connection refused",
            True,
            "check that PostgreSQL runs there and listens on that host and port",
        )
    if isinstance(exc, OSError | EOFError) or (
        isinstance(exc, asyncpg.InterfaceError) and _closed(exc)
    ):
        return _FAULTS["08"]
    if isinstance(exc, TimeoutError):
        return (
            "timed out",
            True,
            "check that PostgreSQL there is reachable from this machine and not overloaded",
        )
    return ("database error", False, "see the database's message")
