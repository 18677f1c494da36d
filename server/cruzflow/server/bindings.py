"""What ``self.env`` holds: the config's vars and the resources it binds."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import aiosqlite


class SqliteDatabase:
    """A SQLite database bound in the config (the seed's D1 binding).

    Each call runs in its own transaction, committed (and fsynced) before it
    returns, so what a step wrote is durable when the step's result is stored.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def _connection(self) -> aiosqlite.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = await aiosqlite.connect(self.path)
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute("PRAGMA synchronous = FULL")
            await conn.execute("PRAGMA busy_timeout = 5000")
            self._conn = conn
        return self._conn

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one parameterised statement, commit, and return its rows."""
        async with self._lock:
            conn = await self._connection()
            rows = await conn.execute_fetchall(sql, tuple(params))
            await conn.commit()
            return [tuple(r) for r in rows]

    async def executescript(self, script: str) -> None:
        """Run several statements (schema setup), then commit."""
        async with self._lock:
            conn = await self._connection()
            await conn.executescript(script)
            await conn.commit()

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


class Env:
    """Attribute access to the vars and bindings of the config: ``self.env.DB``."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:
        known = ", ".join(sorted(self.__dict__)) or "none"
        raise AttributeError(
            f"env has no binding or var {name!r} (declared: {known}); add it to the config's "
            f"[vars], [[sqlite_databases]] or [[workflows]]"
        )

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)

    def __contains__(self, name: object) -> bool:
        return name in self.__dict__

    async def aclose(self) -> None:
        for value in self.__dict__.values():
            if isinstance(value, SqliteDatabase):
                await value.close()
