"""The SQLite saga log: the port's conformance suite on files, and what is SQLite's alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from conformance.saga_log import SagaLogConformance

from sagakit.adapters.sqlite_log import SQLiteSagaLog
from sagakit.ports.saga_log import SagaLog


class TestSQLiteSagaLog(SagaLogConformance):
    @pytest.fixture(autouse=True)
    def _folder(self, tmp_path: Path) -> None:
        self.path = tmp_path / "sagas.db"

    async def make_log(self) -> SagaLog:
        return SQLiteSagaLog(self.path)

    async def make_sibling(self, log: SagaLog) -> SagaLog | None:
        return SQLiteSagaLog(self.path)
