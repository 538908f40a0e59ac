"""The public API of ``sagakit``: every name in ``__all__``, imported on first use.

The package imports nothing up front (PEP 562), so that a process using one
corner of sagakit (the protocol node, say) does not import the rest. These
tests hold the lazy table, the imports type checkers read and ``__all__`` to
one another, and check in fresh interpreters what an import actually loads.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sagakit

SRC = Path(sagakit.__file__).resolve().parents[1]

# The backends picked from a URL, their private helpers and their drivers: none
# belongs in a process that does not open their URL.
URL_PICKED = {
    "sagakit.adapters.amqp_bus",
    "sagakit.adapters._amqp_delivery",
    "sagakit.adapters.nats_bus",
    "sagakit.adapters.nats_consumer",
    "sagakit.adapters.redis_bus",
    "sagakit.adapters._redis_consumer",
    "sagakit.adapters.sqlite_log",
    "sagakit.adapters.sqlite_store",
    "sagakit.adapters.postgres_log",
    "sagakit.adapters._postgres_group",
    "sagakit.adapters._postgres_sql",
    "aio_pika",
    "asyncpg",
    "nats",
    "redis",
    "sqlite3",
}


def modules_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``statement``."""
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


@pytest.mark.parametrize("name", sagakit.__all__)
def test_every_public_name_resolves_to_its_module_s_object(name: str) -> None:
    origin = importlib.import_module(sagakit._ORIGINS[name])
    assert getattr(sagakit, name) is getattr(origin, name)
    namespace: dict[str, object] = {}
    exec(f"from sagakit import {name}", namespace)
    assert namespace[name] is getattr(origin, name)


def test_star_import_gives_all_the_public_names() -> None:
    namespace: dict[str, object] = {}
    exec("from sagakit import *", namespace)
    assert set(sagakit.__all__) <= set(namespace)


def test_dir_lists_the_public_names_before_they_are_used() -> None:
    assert set(sagakit.__all__) <= set(dir(sagakit))
    assert "__version__" in dir(sagakit)


def test_a_missing_name_raises_attribute_error_naming_it() -> None:
    with pytest.raises(AttributeError, match="'Orchestrater'") as caught:
        _ = sagakit.Orchestrater  # type: ignore[attr-defined]
    assert caught.value.name == "Orchestrater"
    assert not hasattr(sagakit, "Orchestrater")
    with pytest.raises(ImportError, match="Orchestrater"):
        exec("from sagakit import Orchestrater", {})


def test_version_is_a_plain_attribute() -> None:
    assert sagakit.__dict__["__version__"] == "0.1.0"


def test_the_lazy_table_the_type_checking_imports_and_all_agree() -> None:
    """A name added to one of the three lists and not the others fails here."""
    tree = ast.parse(Path(sagakit.__file__).read_text(encoding="utf-8"))
    blocks = [
        node
        for node in tree.body
        if isinstance(node, ast.If)
        and isinstance(node.test, ast.Name)
        and node.test.id == "TYPE_CHECKING"
    ]
    assert len(blocks) == 1
    imported = {
        alias.asname or alias.name: stmt.module
        for stmt in blocks[0].body
        if isinstance(stmt, ast.ImportFrom) and stmt.module != "typing"
        for alias in stmt.names
    }
    assert imported == sagakit._ORIGINS
    assert set(sagakit._ORIGINS) == set(sagakit.__all__)
    assert len(sagakit.__all__) == len(set(sagakit.__all__))


def test_importing_the_package_imports_none_of_its_modules() -> None:
    loaded = modules_after("import sagakit")
    assert "sagakit" in loaded
    assert {m for m in loaded if m.startswith("sagakit.")} == set()


def test_a_public_name_imports_only_what_it_needs() -> None:
    loaded = modules_after("from sagakit import SagakitError")
    assert {m for m in loaded if m.startswith("sagakit.")} == {"sagakit.errors"}


def test_the_node_loads_no_url_picked_backend() -> None:
    loaded = modules_after("import sagakit.node.runner")
    assert "sagakit.node.runner" in loaded
    assert loaded & URL_PICKED == set()


def test_opening_a_backend_imports_it(tmp_path: Path) -> None:
    """The check above is worth something: the same probe sees a backend once its URL is opened."""
    url = f"sqlite:///{tmp_path / 'sagas.db'}"
    loaded = modules_after(f"import sagakit; sagakit.open_saga_log({url!r})")
    assert "sagakit.adapters.sqlite_log" in loaded
