"""``python3 main.py --store sqlite:///path``: the saga node's log outlives the process."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.test_node import MAIN, REPO, execute, run_node


def test_a_restarted_node_answers_a_repeated_execute_from_the_file(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'sagas.db'}"
    first = run_node(execute(1, "s", ["a", "b"], fail_step="b"), [*MAIN, "--store", store])
    assert first.code == 0, first.stderr
    assert first.reply(1)["compensated_steps"] == ["a"]
    # A new process on the same file: the record answers, whatever fail_step now says.
    again = run_node(
        execute(2, "s", ["a", "b"]) + execute(3, "s", ["a", "c"]) + execute(4, "t", ["a"]),
        [*MAIN, "--store", store],
    )
    assert again.code == 0, again.stderr
    assert again.reply(2) | {"in_reply_to": 1} == first.reply(1)
    assert (again.reply(3)["type"], again.reply(3)["code"]) == ("error", 22)
    assert again.reply(4)["type"] == "saga_completed"


def test_a_store_that_cannot_be_opened_stops_the_node_at_once(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.db"
    foreign.write_text("not a database")
    for store in (f"sqlite:///{foreign}", "nosuch://x", f"sqlite:///{tmp_path}/no/dir/x.db"):
        proc = subprocess.run(
            [*MAIN, "--store", store],
            input=execute(1, "s", ["a"]).encode(),
            capture_output=True,
            timeout=20,
            cwd=REPO,
        )
        assert proc.returncode == 2, (store, proc.stderr)
        assert proc.stdout == b""
        err = proc.stderr.decode()
        assert "cannot serve" in err
        assert "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
