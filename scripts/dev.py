#!/usr/bin/env python3
"""Set up the project's virtual environment, then run a task in it. Standard library only.

    python3 scripts/dev.py demo    # sagakit demo, on the in-memory defaults
    python3 scripts/dev.py test    # lint, types and the whole test suite
    python3 scripts/dev.py bench   # the benchmarks (extra arguments are passed on)
    python3 scripts/dev.py node    # the protocol node on stdin/stdout
    python3 scripts/dev.py fuzz    # fuzz the node's decoder and router (seconds: 60)
    python3 scripts/dev.py setup   # only the environment

Works on a fresh Debian or Ubuntu with nothing but Python 3.11+: where the
distribution leaves ensurepip out (no python3-venv package), the environment is
made without pip and pip is installed from its wheel on PyPI.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
import venv
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("SAGAKIT_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"
STAMP = VENV / ".sagakit-installed"
LINTED = ["src", "tests", "benchmarks", "examples", "scripts", "fuzz", "main.py"]


def say(message: str) -> None:
    print(f"[dev] {message}", file=sys.stderr, flush=True)


def run(*args: str | Path, check: bool = True) -> int:
    return subprocess.run([str(a) for a in args], cwd=ROOT, check=check).returncode


def pip_from_pypi() -> None:
    """Install pip into a venv made without it, from the pip wheel on PyPI."""
    index = os.environ.get("SAGAKIT_PYPI_JSON", "https://pypi.org/pypi/pip/json")
    with urllib.request.urlopen(index, timeout=60) as response:
        release = json.load(response)
    wheel = next(u for u in release["urls"] if u["filename"].endswith("-py3-none-any.whl"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / wheel["filename"]
        # Mirrors may give the wheel's address relative to the index page.
        url = urllib.parse.urljoin(index, wheel["url"])
        with urllib.request.urlopen(url, timeout=120) as response:
            data = response.read()
        if hashlib.sha256(data).hexdigest() != wheel["digests"]["sha256"]:
            raise SystemExit("the pip wheel downloaded from PyPI does not match its digest")
        path.write_bytes(data)
        # A wheel is a zip that Python can run from: pip installs itself from it.
        run(PYTHON, f"{path}/pip", "install", "--quiet", str(path))


def make_venv() -> None:
    say(f"creating {VENV}")
    try:
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    except (subprocess.CalledProcessError, OSError) as exc:
        say(f"ensurepip is not available ({exc}); installing pip from PyPI instead")
        venv.EnvBuilder(with_pip=False, clear=True).create(VENV)
        pip_from_pypi()
    if run(PYTHON, "-m", "pip", "--version", check=False) != 0:
        pip_from_pypi()


@contextlib.contextmanager
def one_setup_at_a_time() -> Iterator[None]:
    """Hold the environment's lock file. Two setups at once (the demo and the tests
    started together on a fresh clone) upgraded pip under each other, and both failed
    with pip half installed; the second now waits, then finds the work done."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock, as before
        yield
        return
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(VENV.parent / f"{VENV.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def setup() -> None:
    # This script runs on whatever python3 the machine has, older ones included.
    if sys.version_info < (3, 11):  # noqa: UP036
        raise SystemExit(f"sagakit needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    with one_setup_at_a_time():
        setup_unlocked()


def setup_unlocked() -> None:
    if not PYTHON.exists() or run(PYTHON, "-c", "import sys", check=False) != 0:
        make_venv()
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    say("installing sagakit and its development tools")
    run(PYTHON, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(PYTHON, "-m", "pip", "install", "--quiet", "-e", ".[dev]")
    STAMP.write_text(wanted)


def setup_bench() -> None:
    """The benchmarks' peers (DBOS Transact) on top of the development environment."""
    setup()
    stamp = VENV / ".sagakit-bench-installed"
    with one_setup_at_a_time():
        wanted = STAMP.read_text()
        if stamp.exists() and stamp.read_text() == wanted:
            return
        say("installing the benchmarks' peers")
        run(PYTHON, "-m", "pip", "install", "--quiet", "-e", ".[dev,bench]")
        stamp.write_text(wanted)


def fuzz(args: list[str]) -> int:
    """The node's coverage-guided fuzzer for a bounded time (default 60 s), on its corpus."""
    with one_setup_at_a_time():
        if run(PYTHON, "-c", "import atheris", check=False) != 0:
            say("installing the fuzzer (the [fuzz] extra)")
            run(PYTHON, "-m", "pip", "install", "--quiet", "-e", ".[dev,fuzz]")
    scratch = Path(tempfile.gettempdir()) / "sagakit-fuzz-corpus"
    scratch.mkdir(exist_ok=True)
    seconds = args[0] if args and args[0].isdigit() else "60"
    rest = args[1:] if args and args[0].isdigit() else args
    return run(
        PYTHON,
        ROOT / "fuzz" / "node_fuzz.py",
        # New inputs go to the first directory: a scratch one, so that the
        # checked-in corpus only changes on purpose.
        scratch,
        ROOT / "fuzz" / "corpus" / "node",
        f"-max_total_time={seconds}",
        "-max_len=8192",
        # Findings (crash-*) land in a scratch directory, not in the checkout.
        f"-artifact_prefix={tempfile.gettempdir()}/sagakit-fuzz-",
        *rest,
        check=False,
    )


def test(args: list[str]) -> int:
    steps = [
        [BIN / "ruff", "check", *LINTED],
        [BIN / "ruff", "format", "--check", *LINTED],
        [BIN / "mypy", "--strict", "src"],
        [PYTHON, "-m", "pytest", *args],
    ]
    for step in steps:
        say(" ".join(str(part) for part in step))
        code = run(*step, check=False)
        if code != 0:
            say(f"failed with exit status {code}")
            return code
    return 0


def main(argv: list[str]) -> int:
    task, args = (argv[0], argv[1:]) if argv else ("help", [])
    tasks = {
        "setup": lambda: 0,
        "demo": lambda: run(BIN / "sagakit", "demo", *args, check=False),
        "test": lambda: test(args),
        "bench": lambda: setup_bench() or run(PYTHON, "-m", "benchmarks", *args, check=False),
        "node": lambda: run(BIN / "sagakit", "node", *args, check=False),
        "fuzz": lambda: fuzz(args),
    }
    if task not in tasks:
        print(__doc__, file=sys.stderr)
        return 0 if task in ("help", "-h", "--help") else 2
    setup()
    return tasks[task]()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
