"""Params declared as a TypedDict are checked when an instance is created.

``class Onboarding(WorkflowEntrypoint[OnboardingParams])`` with
``OnboardingParams`` a ``TypedDict`` says what ``event.payload`` holds. A
create whose params do not match is refused with INVALID_ARGUMENT naming
each field, instead of an instance that fails later with a ``KeyError``.
The check is strict (a JSON string is not a number, nor a number a
string), as the workflow gets the params as they were sent; keys the
TypedDict does not name are allowed, as a TypedDict allows them.
Workflows with untyped params (``WorkflowEntrypoint`` or
``WorkflowEntrypoint[Any]``) are not checked.
"""

from __future__ import annotations

import logging
import types
import typing
from collections.abc import Callable
from typing import Any

import pydantic
import typing_extensions

from cruzflow.sdk.api import WorkflowEntrypoint
from cruzflow.server.engine.errors import InvalidArgument

log = logging.getLogger("cruzflow.engine")

_MAX_PROBLEMS = 5

Checker = Callable[[bytes], None]


def declared_params(cls: type[Any]) -> Any:
    """The type argument of the ``WorkflowEntrypoint[...]`` that ``cls`` derives
    from, or None if it gives none."""
    for klass in cls.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            if typing.get_origin(base) is WorkflowEntrypoint:
                args = typing.get_args(base)
                return args[0] if args else None
    return None


def checker(workflow: str, cls: type[Any]) -> Checker | None:
    """A function that raises InvalidArgument when JSON params do not match the
    TypedDict ``cls`` declares; None when it declares none."""
    declared = declared_params(cls)
    if declared is None or not typing.is_typeddict(declared):
        return None
    name = declared.__name__
    try:
        adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(_portable(declared))
    except (pydantic.PydanticUserError, NameError, TypeError) as exc:
        log.warning(
            "workflow %r: its params type %s cannot be checked (%s); creates are not checked "
            "against it",
            workflow,
            name,
            exc,
        )
        return None

    def check(params: bytes) -> None:
        try:
            adapter.validate_json(params, strict=True)
        except pydantic.ValidationError as exc:
            problems = [_problem(e) for e in exc.errors(include_url=False)]
            shown = "; ".join(problems[:_MAX_PROBLEMS])
            if len(problems) > _MAX_PROBLEMS:
                shown += f"; and {len(problems) - _MAX_PROBLEMS} more"
            raise InvalidArgument(
                f"params_json: does not match {name}, the params workflow {workflow!r} "
                f"declares: {shown}; send the fields it names with their types"
            ) from None

    return check


def _portable(tp: Any) -> Any:
    """``tp`` with each TypedDict in it made anew as a ``typing_extensions.TypedDict``
    with its annotations resolved: pydantic needs the latter before Python 3.12,
    and under ``from __future__ import annotations`` a TypedDict's own
    ``__required_keys__`` misses ``NotRequired[...]`` (it sees strings)."""
    if typing.is_typeddict(tp):
        hints = typing.get_type_hints(tp, include_extras=True)
        required = getattr(tp, "__required_keys__", frozenset(hints))
        fields = {}
        for key, hint in hints.items():
            needed = key in required
            origin = typing.get_origin(hint)
            if origin in _REQUIRED:
                needed = True
            elif origin in _NOT_REQUIRED:
                needed = False
            inner = _portable(_strip_required(hint))
            fields[key] = (
                typing_extensions.Required[inner]
                if needed
                else typing_extensions.NotRequired[inner]
            )
        return typing_extensions.TypedDict(tp.__name__, fields)  # type: ignore[operator]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is None or not args:
        return tp
    if origin is typing.Annotated:
        return typing.Annotated[(_portable(args[0]), *tp.__metadata__)]
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_portable(a) for a in args)]  # noqa: UP007
    if origin is typing.Literal:
        return tp
    return origin[tuple(_portable(a) for a in args)]


_REQUIRED = (typing.Required, typing_extensions.Required)
_NOT_REQUIRED = (typing.NotRequired, typing_extensions.NotRequired)


def _strip_required(hint: Any) -> Any:
    """The type inside ``Required[...]`` or ``NotRequired[...]``."""
    while typing.get_origin(hint) in (*_REQUIRED, *_NOT_REQUIRED):
        hint = typing.get_args(hint)[0]
    return hint


def _problem(error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(the params)"
    kind = error["type"]
    if kind == "missing":
        return f"{where}: required, missing"
    value = repr(error.get("input"))
    if len(value) > 40:
        value = value[:39] + "…"
    return f"{where}: {error['msg'].lower()}, got {value}"
