"""scripts/dev.py, the README's two commands: one setup of an environment at a time."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_second_setup_waits_for_the_first(tmp_path: Path) -> None:
    """The demo and the tests started together on a fresh clone each upgraded pip in the
    one environment, under each other: both failed, pip half installed. A setup now
    holds the environment's lock, so the second waits, then finds the work done."""
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)  # an environment set up already
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    (env_dir / ".sagakit-installed").write_text(wanted)
    with (tmp_path / "env.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a setup under way
        second = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "dev.py"), "setup"],
            env={**os.environ, "SAGAKIT_VENV": str(env_dir)},
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)
        assert second.poll() is None, "the second setup went ahead under the first"
    _, err = second.communicate(timeout=30)
    assert second.returncode == 0, err
