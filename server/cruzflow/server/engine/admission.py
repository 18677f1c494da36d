"""Admission: new instances, checked, stored and started or queued.

Every field is checked before anything is stored (the workflow, the id,
the params, against a TypedDict if the workflow declares one, the lookup
key). An id a caller chose is reserved against concurrent creates here and
checked in the store; the store has the last word (``Refusal.CONFLICT``)
when several servers share it. Instances admitted with no await in between
commit in one transaction.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from cruzflow.server.engine import validate
from cruzflow.server.engine.core import Core, WorkflowSpec, exists_message, ms
from cruzflow.server.engine.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from cruzflow.server.engine.journal import Durable
from cruzflow.server.engine.params import checker as params_checker
from cruzflow.server.engine.run import Run
from cruzflow.server.engine.scheduler import Scheduler
from cruzflow.server.records import EventKind, Gate, InstanceRecord, InstanceStatus

NewInstance = tuple[str, str, str | bytes, str, int, str]
"""What CreateInstances asks for each instance: workflow, instance id, params,
lookup key, priority, concurrency key (see ``Admission.create_many``)."""


def concurrency_key(workflow: str, gate: Gate, params: bytes, override: str) -> str:
    """The key whose slots a new instance of a limited workflow takes: the
    request's, else the one at the config's key path in the params ("" for a
    workflow-wide limit). InvalidArgument when the params lack it."""
    if override:
        if not gate.key_path:
            raise InvalidArgument(
                f"concurrency_key: workflow {workflow!r} has one limit for all its instances "
                f"(its config names no concurrency_key); leave this empty"
            )
        return override
    if not gate.key_path:
        return ""
    path = ".".join(gate.key_path)
    value: Any = json.loads(params) if params else None
    for part in gate.key_path:
        if not isinstance(value, dict) or part not in value:
            raise InvalidArgument(
                f"params_json: workflow {workflow!r} limits its instances per concurrency key "
                f"params.{path} (concurrency_key in its config), which these params lack; add "
                f"it to the params, or pass concurrency_key in the request"
            )
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidArgument(
            f"params_json: params.{path} is the concurrency key of workflow {workflow!r} and "
            f"must be a string or an integer, not {type(value).__name__}"
        )
    return str(value)


class Admission:
    def __init__(self, core: Core, scheduler: Scheduler) -> None:
        self._core = core
        self._scheduler = scheduler
        # Ids being created now: a second create of one is refused at once.
        self._creating: set[str] = set()
        # Workflows whose params are a TypedDict: their creates are checked.
        self._params_checks = {
            name: check
            for name, spec in core.workflows.items()
            if (check := params_checker(name, spec.cls)) is not None
        }

    async def create(
        self,
        workflow: str,
        instance_id: str = "",
        params: str | bytes = b"",
        lookup_key: str = "",
        priority: int = 0,
        concurrency_key: str = "",
        schedule_id: str | None = None,
    ) -> tuple[str, InstanceStatus]:
        """Store a new instance durably and schedule it; returns its id and status.
        ``schedule_id``: the schedule creating it (engine/schedules.py)."""
        self._core.refuse_while_store_fails()
        spec, params_bytes, key = self.check_new(
            workflow, instance_id, params, lookup_key, concurrency_key
        )
        if instance_id:
            await self.reserve_id(instance_id)
        else:
            instance_id = uuid.uuid4().hex
        try:
            status, durable = self.admit(
                spec, instance_id, params_bytes, lookup_key, priority, key, schedule_id=schedule_id
            )
            await self._core.durable(durable, "the instance could not be stored", instance_id)
        finally:
            self.release_id(instance_id)
        return instance_id, status

    def check_new(
        self,
        workflow: str,
        instance_id: str,
        params: str | bytes,
        lookup_key: str,
        key: str = "",
    ) -> tuple[WorkflowSpec, bytes, str | None]:
        """Validate a new instance's fields; raises a ServiceError naming the field.
        Returns the spec, the params, and the concurrency key (None: no limits)."""
        if self._core.stopping:
            raise Unavailable("the server is shutting down; retry once it is back")
        if not workflow:
            raise InvalidArgument(
                "workflow: required; name a registered workflow (see ListWorkflows)"
            )
        validate.check_workflow(workflow)
        spec = self._core.workflows.get(workflow)
        if spec is None:
            known = ", ".join(sorted(self._core.workflows)) or "none"
            raise NotFound(
                f"workflow: {workflow!r} is not registered on this server (registered: {known}); "
                f"see ListWorkflows"
            )
        params_bytes = validate.parse_json_field(
            params,
            "params_json",
            self._core.limits.max_payload_bytes,
            self._core.limits.max_json_depth,
        )
        check = self._params_checks.get(workflow)
        if check is not None:
            check(params_bytes)
        if instance_id:
            self._core.check_id(instance_id, creating=True)
        validate.check_text(
            lookup_key,
            "lookup_key",
            self._core.limits.max_lookup_key_length,
            "max_lookup_key_length",
            required=False,
        )
        if spec.gate is None:
            if key:
                raise InvalidArgument(
                    f"concurrency_key: workflow {workflow!r} has no concurrency or rate limit "
                    f"(see its [[workflows]] entry); leave this empty"
                )
            return spec, params_bytes, None
        key = concurrency_key(workflow, spec.gate, params_bytes, key)
        validate.check_text(
            key,
            "concurrency_key",
            self._core.limits.max_lookup_key_length,
            "max_lookup_key_length",
            required=False,
        )
        return spec, params_bytes, key

    async def reserve_id(self, instance_id: str) -> None:
        """Claim an id for creation, or raise AlreadyExists.

        The claim holds until the caller discards the id from ``_creating``
        (after the create is durable or has failed).
        """
        if instance_id in self._creating or instance_id in self._core.live:
            raise AlreadyExists(exists_message(instance_id))
        self._creating.add(instance_id)
        try:
            if await self._core.store.get_instance(instance_id) is not None:
                raise AlreadyExists(exists_message(instance_id))
        except BaseException:
            self._creating.discard(instance_id)
            raise

    def release_id(self, instance_id: str) -> None:
        """End the claim ``reserve_id`` took (the instance is admitted, or not)."""
        self._creating.discard(instance_id)

    def admit(
        self,
        spec: WorkflowSpec,
        instance_id: str,
        params: bytes,
        lookup_key: str = "",
        priority: int = 0,
        key: str | None = None,
        parent: tuple[str, bool] | None = None,
        schedule_id: str | None = None,
    ) -> tuple[InstanceStatus, Durable]:
        """Add a validated instance to the open batch and start or queue it;
        ``parent`` (id, abandon) for a child started by a step.child.

        Synchronous: instances admitted with no await in between commit in
        the same transaction (a child with its parent's step). An instance of a
        limited workflow (``key`` set) is stored queued, waiting for its key's
        slot; the same transaction lets it through if one is free
        (Scheduler.let_through starts it).
        """
        if key is not None:
            # Stored queued, waiting for its key's slot.
            assert spec.gate is not None
            run, durable = self._store_new(
                spec, instance_id, params, InstanceStatus.QUEUED, lookup_key, priority, key,
                parent, schedule_id,
            )  # fmt: skip
            self._core.journal.gate(instance_id, spec.name, spec.gate)
            if not self._core.shared:
                # On a shared store it waits there, for any server to take once let through.
                self._core.live[instance_id] = run
                run.queued = True
                self._core.gated[instance_id] = run
            return InstanceStatus.QUEUED, durable
        start_now = (
            not self._core.queue and len(self._core.runs) < self._core.limits.max_running_instances
        )
        status = InstanceStatus.RUNNING if start_now else InstanceStatus.QUEUED
        run, durable = self._store_new(
            spec, instance_id, params, status, lookup_key, priority, None, parent, schedule_id
        )
        if start_now:
            self._core.live[instance_id] = run
            self._scheduler.start(run)
        elif self._core.shared:
            # Stored unowned: whichever server has a slot first claims it (the
            # store tells them all), this one included.
            self._scheduler.runnable_elsewhere()
        else:
            self._core.live[instance_id] = run
            run.queued = True
            self._core.queue.append(run)
        return status, durable

    def _store_new(
        self,
        spec: WorkflowSpec,
        instance_id: str,
        params: bytes,
        status: InstanceStatus,
        lookup_key: str,
        priority: int,
        key: str | None,
        parent: tuple[str, bool] | None,
        schedule_id: str | None,
    ) -> tuple[Run, Durable]:
        """The new instance's row and first event in the open batch, and its
        handle; ``key`` set: it waits at its concurrency gate (gate 0)."""
        now = ms()
        observer = self._core.observer
        record = InstanceRecord(
            instance_id, spec.name, status, params, now, now, lookup_key=lookup_key or None,
            trace_parent=observer.creating() if observer is not None else None,
            priority=priority, concurrency_key=key, gate=None if key is None else 0,
            parent_id=parent[0] if parent else None, abandon=bool(parent and parent[1]),
            schedule_id=schedule_id,
        )  # fmt: skip
        if observer is not None:
            observer.created(spec.name, 1)
            observer.status_changed(spec.name, None, status)
        run = Run(self._core, record, spec, resumed=False)
        self._core.journal.insert_instance(record)
        return run, run.emit(EventKind.STATUS_CHANGED, {"status": int(status)})

    async def create_many(self, requests: list[NewInstance]) -> list[tuple[str, InstanceStatus]]:
        """Store new instances in one transaction, all of them or none; returns the
        id and status of each, in order.

        ``requests`` holds (workflow, instance_id, params, lookup_key, priority,
        concurrency_key) each. A
        refusal names every bad item: InvalidArgument if any is malformed (or
        repeats an id of the batch), else NotFound for unknown workflows, else
        AlreadyExists for ids taken.
        """
        if self._core.stopping:
            raise Unavailable("the server is shutting down; retry once it is back")
        self._core.refuse_while_store_fails()
        limit = self._core.limits.max_batch_size
        if not requests:
            raise InvalidArgument(f"requests: empty; send 1 to {limit} instances to create")
        if len(requests) > limit:
            raise InvalidArgument(
                f"requests: {len(requests)} instances, over the limit of {limit} per call "
                f"(limits.max_batch_size); split them over several calls"
            )
        problems: list[tuple[int, InvalidArgument | NotFound | AlreadyExists]] = []
        checked: list[tuple[WorkflowSpec, bytes, str | None] | None] = []
        first_use: dict[str, int] = {}
        for i, (workflow, instance_id, params, lookup_key, _, key) in enumerate(requests):
            try:
                checked.append(self.check_new(workflow, instance_id, params, lookup_key, key))
            except (InvalidArgument, NotFound) as exc:
                problems.append((i, exc))
                checked.append(None)
                continue
            if instance_id in first_use:
                problems.append(
                    (
                        i,
                        InvalidArgument(
                            f"instance_id: {instance_id!r} is also the id of "
                            f"requests[{first_use[instance_id]}]; ids in one batch must differ"
                        ),
                    )
                )
            elif instance_id:
                first_use[instance_id] = i
        reserved: list[str] = []
        try:
            # Each id is claimed until the batch is durable (or refused); a
            # taken one is one more problem to name.
            for instance_id, i in first_use.items():
                try:
                    await self.reserve_id(instance_id)
                except AlreadyExists as exc:
                    problems.append((i, exc))
                    continue
                reserved.append(instance_id)
            if problems:
                raise self._refusal(problems)
            if self._core.stopping:
                raise Unavailable("the server is shutting down; retry once it is back")
            # No await from here to the last admit: one batch, one transaction.
            created: list[tuple[str, InstanceStatus]] = []
            durables: list[Durable] = []
            for item, (_, instance_id, _, lookup_key, priority, _) in zip(
                checked, requests, strict=True
            ):
                assert item is not None
                new_id = instance_id or uuid.uuid4().hex
                status, durable = self.admit(
                    item[0], new_id, item[1], lookup_key, priority, item[2]
                )
                created.append((new_id, status))
                if durable not in durables:
                    durables.append(durable)
            for durable in durables:
                await self._core.durable(
                    durable, "the instances could not be stored", *(i for i, _ in created)
                )
            return created
        finally:
            self._creating.difference_update(reserved)

    @staticmethod
    def _refusal(
        problems: list[tuple[int, InvalidArgument | NotFound | AlreadyExists]],
    ) -> InvalidArgument | NotFound | AlreadyExists:
        """One error naming every bad item, of the gravest kind among them."""
        ordered = sorted(problems, key=lambda p: p[0])
        parts = [f"requests[{i}].{exc}" for i, exc in ordered]
        message = "; ".join(parts)
        # A status message must fit a gRPC trailer (validate.MAX_MESSAGE_BYTES):
        # past a budget, the rest are named by index only.
        budget = validate.MAX_MESSAGE_BYTES // 2
        if len(message.encode()) > budget:
            shown: list[str] = []
            for part in parts:
                budget -= len(part.encode()) + 2
                if shown and budget < 0:
                    break
                shown.append(part)
            rest = ", ".join(str(i) for i, _ in ordered[len(shown) :])
            if rest:
                shown.append(f"and requests {rest} (send again once these are mended to see why)")
            message = "; ".join(shown)
        for kind in (InvalidArgument, NotFound):
            if any(isinstance(exc, kind) for _, exc in problems):
                return kind(message)
        return AlreadyExists(message)
