"""How the PostgreSQL saga log puts its schema in place and checks its version."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import asyncpg  # type: ignore[import-untyped]

from sagakit.errors import ConfigurationError, SchemaMismatch

from . import _postgres_sql as sql
from ._postgres_errors import BACKEND

if TYPE_CHECKING:
    from .postgres_log import PostgresStats

__all__ = ["ensure_schema"]


async def ensure_schema(conn: Any, stats: PostgresStats) -> None:
    """Create the schema on first use, once among workers starting together, and refuse
    a newer one."""
    stats.statements += 1
    found = await conn.fetchval(sql.SCHEMA_VERSION_EXISTS)
    if found is None:
        # Workers starting together: the first creates, the others wait and see it.
        # A session lock, and the check in a transaction begun after it: a check in
        # the locking transaction may not see the catalog change committed meanwhile.
        stats.statements += 3
        await conn.execute(sql.SCHEMA_LOCK)
        try:
            found = await conn.fetchval(sql.SCHEMA_VERSION_EXISTS)
            if found is None:
                stats.statements += 1
                try:
                    async with conn.transaction():
                        await conn.execute(sql.SCHEMA)
                except asyncpg.InvalidSchemaNameError as exc:  # 3F000: no retry helps
                    raise ConfigurationError(
                        f"saga log URL: its search_path names no schema that exists ({exc})"
                        "; create the schema, or name another"
                    ) from exc
                stats.commits += 1
        finally:
            await conn.execute(sql.SCHEMA_UNLOCK)
    stats.statements += 1
    version = await conn.fetchval(sql.SCHEMA_VERSION)
    if version is None or version > sql.VERSION:
        raise SchemaMismatch(
            BACKEND,
            f"the database's sagakit schema is version {version}; "
            f"this sagakit knows up to {sql.VERSION}: upgrade sagakit",
        )
