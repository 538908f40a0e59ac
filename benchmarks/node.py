"""Node throughput: ``python main.py < input > output`` against a bare JSON echo loop.

Both sides are whole subprocesses over the same input file, so interpreter
start-up and pipe I/O are in both figures and the ratio isolates what the node
adds over reading, parsing and writing the same lines.
"""

from __future__ import annotations

import compileall
import json
import os
import resource
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from time import perf_counter

from benchmarks.timing import BenchmarkError, Comparison, Config, Timing, compare

__all__ = ["run"]

REPO = Path(__file__).resolve().parent.parent
STEPS = ("book_flight", "book_hotel", "book_car")
GOAL = 0.50

# The floor any line-oriented JSON node pays: parse each line and write one back.
BASELINE = (
    "import json, sys\n"
    "out = sys.stdout\n"
    "for line in sys.stdin:\n"
    "    out.write(json.dumps(json.loads(line)) + '\\n')\n"
)


def write_input(path: Path, lines: int) -> set[int]:
    """Write ``lines`` one-line ``execute`` requests; return the msg_ids told to fail.

    Every third request fails, at a step that cycles through all three, so the
    node compensates zero, one and two steps in equal measure.
    """
    failing: set[int] = set()
    with path.open("w", encoding="utf-8") as out:
        for n in range(1, lines + 1):
            body: dict[str, object] = {
                "type": "execute",
                "msg_id": n,
                "saga_id": f"saga-{n}",
                "steps": list(STEPS),
            }
            if n % 3 == 0:
                body["fail_step"] = STEPS[(n // 3) % len(STEPS)]
                failing.add(n)
            # Compact separators: the one-line form the seeds' judge sends.
            message = {"src": "c1", "dest": "saga", "body": body}
            out.write(json.dumps(message, separators=(",", ":")) + "\n")
    return failing


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(name: str, argv: list[str], input_path: Path, output_path: Path) -> Timing:
    """Run ``argv`` on the files as stdin/stdout; return its wall and CPU seconds."""
    # The caller's shell must not change the work measured: a log level would
    # change what the node does, PYTHONUNBUFFERED how the baseline writes.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["SAGAKIT_LOG"] = "WARNING"
    with input_path.open("rb") as stdin, output_path.open("wb") as stdout:
        # The child's CPU time (all its threads) is known once it has been
        # waited for: the growth of this process's children total.
        cpu, started = _children_cpu(), perf_counter()
        proc = subprocess.run(
            argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, cwd=REPO, env=env, check=False
        )
        timing = Timing(perf_counter() - started, _children_cpu() - cpu)
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace")[-2000:]
        raise BenchmarkError(f"{name} exited with {proc.returncode}:\n{tail}")
    return timing


def check_node_output(path: Path, lines: int, failing: set[int]) -> None:
    """Fail loudly unless every request got exactly one reply of the right kind."""
    replies: Counter[str] = Counter()
    compensated: set[int] = set()
    answered: set[int] = set()
    with path.open(encoding="utf-8") as replies_file:
        for number, line in enumerate(replies_file, 1):
            try:
                body = json.loads(line)["body"]
                kind, msg_id = body["type"], body["in_reply_to"]
            except (ValueError, KeyError, TypeError) as exc:
                raise BenchmarkError(f"node output line {number} is not a reply: {line!r}") from exc
            replies[kind] += 1
            answered.add(msg_id)
            if kind == "saga_compensated":
                compensated.add(msg_id)
    total = sum(replies.values())
    if total != lines or len(answered) != lines:
        raise BenchmarkError(
            f"node wrote {total} replies to {len(answered)} distinct requests; expected {lines}"
        )
    expected = {"saga_completed": lines - len(failing), "saga_compensated": len(failing)}
    if dict(replies) != expected:
        raise BenchmarkError(f"node replied {dict(replies)}; expected {expected}")
    if compensated != failing:
        wrong = sorted(compensated.symmetric_difference(failing))[:5]
        raise BenchmarkError(f"saga_compensated went to the wrong requests, e.g. msg_ids {wrong}")


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)


def run(config: Config) -> list[Comparison]:
    lines = config.size(100_000, 10_000)
    node_argv = [sys.executable, "main.py"]
    baseline_argv = [sys.executable, "-c", BASELINE]
    with tempfile.TemporaryDirectory(prefix="sagakit-bench-") as tmp:
        work = Path(tmp)
        input_path, output_path = work / "input.jsonl", work / "output.jsonl"
        failing = write_input(input_path, lines)

        # The node as installed: pip byte-compiles a package, so its .pyc files
        # exist even where PYTHONDONTWRITEBYTECODE would stop the node writing
        # them (as on this project's CI machine). Then one unmeasured run of
        # each on a small slice, so that the input is in the page cache.
        compileall.compile_dir(REPO / "src", quiet=1)
        warmup = work / "warmup.jsonl"
        with input_path.open("rb") as src, warmup.open("wb") as dst:
            dst.writelines(line for _, line in zip(range(300), src, strict=False))
        _run("main.py", node_argv, warmup, output_path)
        _run("the baseline loop", baseline_argv, warmup, output_path)

        def node() -> Timing:
            timing = _run("main.py", node_argv, input_path, output_path)
            # Checked after every repeat, off the clock: a figure for a node
            # that answered wrongly is worthless.
            check_node_output(output_path, lines, failing)
            return timing

        def baseline() -> Timing:
            timing = _run("the baseline loop", baseline_argv, input_path, output_path)
            if _count_lines(output_path) != lines:
                raise BenchmarkError("the baseline loop did not echo every line")
            return timing

        return [
            compare(
                config,
                key="node",
                title="node throughput",
                unit="lines/s",
                size=lines,
                subject=("main.py", node),
                baseline=("json.loads/dumps echo loop", baseline),
                goal=GOAL,
            )
        ]
